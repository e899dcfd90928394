"""A TinyStoriesV2-sized stand-in corpus, built from the shared heads, for full-size tests and benchmarks.

    python benchmarks/make_corpus.py --mb 2200 --out /tmp/fullsize/corpus      # ~2.2 GB train + 22 MB valid

Writes OUT/TinyStoriesV2-GPT4-train.txt and OUT/TinyStoriesV2-GPT4-valid.txt in the official format (a story,
then a line `<|endoftext|>`), the names `data fetch` gives the real download. The train file is the 2,316 stories
of the shared train head, shuffled and repeated (each pass reshuffled with a fixed seed) to --mb MB; the valid
file is the lines of the shared valid head (that copy lost its story boundaries: one paragraph per line, so each
line becomes one story here), shuffled and repeated to --valid-mb MB. Deterministic: the same arguments give the
same bytes. Only 2,316 distinct train stories: anything that depends on the variety of the text (tokenizer
quality, how fast the loss falls) is not measured by this stand-in; sizes, speeds and memory are.
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "tinystories"
TRAIN_HEAD = SHARED / "TinyStories-train-head.txt"
VALID_HEAD = SHARED / "TinyStories-valid-head.txt"
EOT = "<|endoftext|>"


def write_repeated(stories: list[bytes], out: Path, size_bytes: int, seed: int) -> tuple[int, int]:
    """Shuffled passes over `stories` until `size_bytes` are written (whole stories). Returns (bytes, stories)."""
    rng = random.Random(seed)
    tmp = out.with_name(f".{out.name}.tmp")
    written = n = 0
    with open(tmp, "wb", buffering=1 << 22) as f:
        while written < size_bytes:
            order = list(range(len(stories)))
            rng.shuffle(order)
            for i in order:
                f.write(stories[i])
                written += len(stories[i])
                n += 1
                if written >= size_bytes:
                    break
    tmp.replace(out)
    return written, n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=float, default=2200,
                    help="size of the train file in MB (default 2200, like V2's 2.2 GB)")
    ap.add_argument("--valid-mb", type=float, default=22, help="size of the valid file in MB (default 22)")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    text = TRAIN_HEAD.read_text(encoding="utf-8")
    train = [f"{s.strip()}\n{EOT}\n".encode() for s in text.split(f"\n{EOT}\n") if s.strip() and s.strip() != EOT]
    valid = [f"{line.strip()}\n{EOT}\n".encode() for line in VALID_HEAD.read_text(encoding="utf-8").splitlines()
             if line.strip()]
    t0 = time.time()
    for name, stories, mb, seed in (("TinyStoriesV2-GPT4-train.txt", train, args.mb, args.seed),
                                    ("TinyStoriesV2-GPT4-valid.txt", valid, args.valid_mb, args.seed + 1)):
        size, n = write_repeated(stories, out / name, int(mb * 1e6), seed)
        print(f"{out / name}: {size:,} bytes, {n:,} stories ({len(stories):,} distinct)")
    print(f"written in {time.time() - t0:.1f}s")


if __name__ == "__main__":
    main()
