"""`data prepare` throughput and memory: tokenizes S MB of TinyStories text (the shared train head repeated) into
the cache in a fresh process, and prints MB/s and peak RSS (the main process and its tokenizer workers summed).
Run at two sizes to see memory stay flat:

    python benchmarks/prepare_speed.py --mb 20
    python benchmarks/prepare_speed.py --mb 200
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from full_scale import _tree_rss  # noqa: E402

TRAIN_HEAD = (Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "tinystories"
              / "TinyStories-train-head.txt")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=float, default=50, help="size of the input text in MB")
    ap.add_argument("--vocab-size", type=int, default=10_000)
    ap.add_argument("--workers", type=int, default=None, help="tokenizer processes (default: one per core)")
    args = ap.parse_args()
    head = TRAIN_HEAD.read_bytes()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        src = tmp / "train.txt"
        with open(src, "wb") as f:
            written = 0
            while written < args.mb * 1e6:
                f.write(head)
                written += len(head)
        tok = tmp / "tok"
        subprocess.run([sys.executable, "-m", "tinystories", "tokenizer", "train", "--from", str(TRAIN_HEAD),
                        "--vocab-size", str(args.vocab_size), "--out", str(tok)], check=True, capture_output=True)
        t0 = time.perf_counter()
        cmd = [sys.executable, "-m", "tinystories", "data", "prepare", "--tokenizer", str(tok), "--from", str(src),
               "--cache-dir", str(tmp / "cache")] + ([] if args.workers is None else ["--workers", str(args.workers)])
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        peak = 0
        while proc.poll() is None:  # the main process and its tokenizer workers together
            peak = max(peak, _tree_rss(proc.pid))
            time.sleep(0.2)
        out, err = proc.communicate()
        secs = time.perf_counter() - t0
        if proc.returncode:
            sys.exit(err)
        peak_mb = peak / 1e6
        r = subprocess.CompletedProcess(cmd, proc.returncode, out, err)
    mb = written / 1e6
    print(r.stdout.strip())
    print(f"{mb:.0f} MB in {secs:.1f} s (process start included) = {mb / secs:.1f} MB/s; peak RSS {peak_mb:.0f} MB "
          f"(all processes); "
          f"{os.cpu_count()} cores")
    print(f"mb_per_s={mb / secs:.2f} peak_rss_mb={peak_mb:.0f}")


if __name__ == "__main__":
    main()
