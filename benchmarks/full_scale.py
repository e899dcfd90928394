"""Every stage on a TinyStoriesV2-sized corpus: wall time, throughput and peak RSS (the whole process tree).

    python benchmarks/make_corpus.py --mb 2200 --out /tmp/fullsize/corpus
    python benchmarks/full_scale.py --data /tmp/fullsize/corpus --work /tmp/fullsize/bench
    python benchmarks/full_scale.py --data /tmp/fullsize/corpus --work /tmp/fullsize/bench --quickstart-minutes 10

Stages (each a fresh `tinystories` process): tokenizer train (the default bounded sample), data prepare of the
whole corpus, data prepare of a quickstart-sized part (a fresh cache root), train start-up and a few steps on the
whole cache, eval on a fixed number of validation tokens, and with --quickstart-minutes a whole quickstart on a
fresh data directory, then its rerun. Peak RSS is sampled every 0.2 s over the process and all its children
(worker processes included) and summed. Say the CPU and how busy the machine was next to any figure.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import threading
import time
from pathlib import Path


def _tree_rss(pid: int) -> int:
    """Resident bytes of `pid` and all its descendants (from /proc)."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(d))
            rss[int(d)] = int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, IndexError, ValueError):
            continue
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        total += rss.get(p, 0)
        todo.extend(children.get(p, []))
    return total


def run_stage(name: str, args: list[str], log: Path, env: dict | None = None) -> dict:
    cmd = [sys.executable, "-m", "tinystories", *args]
    print(f"\n== {name}: tinystories {' '.join(args)}", flush=True)
    t0 = time.time()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        peak = [0]

        def sample():
            while proc.poll() is None:
                peak[0] = max(peak[0], _tree_rss(proc.pid))
                time.sleep(0.2)

        th = threading.Thread(target=sample, daemon=True)
        th.start()
        rc = proc.wait()
        th.join()
    secs = time.time() - t0
    text = log.read_text()
    print("\n".join(text.splitlines()[-12:]))
    if rc != 0:
        print(f"!! {name} failed with exit status {rc} (log: {log})")
    return {"stage": name, "seconds": secs, "peak_rss_mb": peak[0] / 1e6, "rc": rc, "log": str(log)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="the corpus directory (benchmarks/make_corpus.py)")
    ap.add_argument("--work", required=True, help="scratch directory (tokenizers, caches, runs)")
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--part-tokens", type=int, default=None,
                    help="train tokens of the quickstart-sized part (default: what quickstart --minutes 10 asks for)")
    ap.add_argument("--eval-tokens", type=int, default=65536)
    ap.add_argument("--quickstart-minutes", type=float, default=None,
                    help="also run quickstart twice on a fresh data directory: the first run builds the tokenizer and "
                         "the cache, the rerun (a new --out) trains again with them")
    ap.add_argument("--stages", default="tokenizer,prepare,part,train,eval",
                    help="comma-separated subset of tokenizer,prepare,part,train,eval")
    args = ap.parse_args()
    data, work = Path(args.data).resolve(), Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    stages = set(args.stages.split(","))
    train_mb = sum(f.stat().st_size for f in data.iterdir() if "valid" not in f.name) / 1e6
    val_mb = sum(f.stat().st_size for f in data.iterdir() if "valid" in f.name) / 1e6
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    print(f"corpus {data}: train {train_mb:,.0f} MB, valid {val_mb:,.0f} MB; {os.cpu_count()} CPU(s), {cpu}, "
          f"{platform.python_version()}; load average at start {os.getloadavg()[0]:.1f}")
    results = []
    tok = work / f"tok{args.vocab_size}"
    if "tokenizer" in stages or not (tok / "tokenizer.json").is_file():
        r = run_stage("tokenizer train", ["tokenizer", "train", "--from", str(data), "--vocab-size",
                                          str(args.vocab_size), "--out", str(tok), "--force"], work / "tokenizer.log")
        sample = json.loads((tok / "training-sample.json").read_text())
        r["throughput"] = f"{sample['bytes'] / 1e6 / r['seconds']:.1f} MB/s ({sample['stories']:,} stories sampled)"
        results.append(r)
    if "prepare" in stages:
        r = run_stage("data prepare (whole corpus)", ["data", "prepare", "--tokenizer", str(tok), "--from", str(data),
                                                      "--cache-dir", str(work / "cache")], work / "prepare.log")
        m = re.search(r"\(([\d.]+) MB/s of text", Path(r["log"]).read_text())
        r["throughput"] = f"{(train_mb + val_mb) / r['seconds']:.1f} MB/s end to end" + (
            f", {m.group(1)} MB/s inside" if m else "")
        results.append(r)
    if "part" in stages:
        if args.part_tokens is None:
            from tinystories.quickstart import cache_tokens_for
            args.part_tokens = cache_tokens_for(10, on_gpu=False)
        r = run_stage(f"data prepare --tokens {args.part_tokens:,} (quickstart part)",
                      ["data", "prepare", "--tokenizer", str(tok), "--from", str(data), "--cache-dir",
                       str(work / "cache-part"), "--tokens", str(args.part_tokens)], work / "part.log")
        r["throughput"] = "see log"
        results.append(r)
    if "train" in stages:
        run = work / "run"
        r = run_stage("train start-up + 3 steps (whole cache)",
                      ["train", "--config", "configs/cpu.yaml", "--data", str(data), "--out", str(run), "--force",
                       *(a for kv in (f"data.data_dir={work}", f"tokenizer.path={tok}", "train.max_steps=3",
                                      "train.max_minutes=null", "train.compile=false", "train.eval_interval=1000",
                                      "train.checkpoint_interval=1000") for a in ("--set", kv))],
                      work / "train.log")
        r["throughput"] = "-"
        results.append(r)
        if "eval" in stages:
            r = run_stage(f"eval --max-tokens {args.eval_tokens}",
                          ["eval", "--checkpoint", str(run), "--max-tokens", str(args.eval_tokens),
                           "--num-stories", "0"], work / "eval.log")
            r["throughput"] = f"{args.eval_tokens / r['seconds']:,.0f} tokens/s end to end"
            results.append(r)
    if args.quickstart_minutes:
        qdata = work / "qs-data"
        # first run: everything from nothing; rerun: a new run (trained again) whose tokenizer and cache exist
        for which, run in (("first run", "qs-run"), ("rerun, tokenizer and cache exist", "qs-run-2")):
            r = run_stage(f"quickstart --minutes {args.quickstart_minutes:g} ({which})",
                          ["quickstart", "--data", str(data), "--minutes", str(args.quickstart_minutes), "--out",
                           str(work / run), "--data-dir", str(qdata)], work / f"quickstart-{which[:5]}.log")
            r["throughput"] = "-"
            results.append(r)
    print(f"\n{'stage':58} {'time':>9} {'peak RSS':>10}  throughput")
    for r in results:
        print(f"{r['stage']:58} {r['seconds']:8.1f}s {r['peak_rss_mb']:8,.0f}MB  {r['throughput']}"
              + ("" if r["rc"] == 0 else f"  (FAILED rc={r['rc']})"))
    print(f"load average at the end {os.getloadavg()[0]:.1f} (a shared machine: other jobs ran at the same time)")
    (work / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
