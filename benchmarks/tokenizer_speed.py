"""Tokenizer training speed: a byte-level BPE on N stories (the shared train head repeated to N if needed).

    python benchmarks/tokenizer_speed.py --stories 100000 --vocab-size 10000
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
import time
from pathlib import Path

from tinystories.data.text import iter_documents
from tinystories.data.tokenizer import load_tokenizer, train_bpe

TRAIN_HEAD = (Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "tinystories"
              / "TinyStories-train-head.txt")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stories", type=int, default=100_000)
    ap.add_argument("--vocab-size", type=int, default=10_000)
    ap.add_argument("--text", type=Path, default=TRAIN_HEAD)
    args = ap.parse_args()
    real = list(iter_documents([args.text]))
    docs = list(itertools.islice(itertools.cycle(real), args.stories))
    n_bytes = sum(len(d.encode()) for d in docs)
    note = f" (the {len(real):,} real stories of {args.text.name} repeated)" if len(real) < args.stories else ""
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        path = train_bpe(iter(docs), args.vocab_size, Path(tmp))
        secs = time.perf_counter() - t0
        vocab = load_tokenizer(path).vocab_size
    print(f"{len(docs):,} stories{note}, {n_bytes / 1e6:.1f} MB -> {vocab:,}-token BPE in {secs:.1f} s "
          f"({n_bytes / 1e6 / secs:.1f} MB/s)")
    print(f"seconds={secs:.2f}")


if __name__ == "__main__":
    main()
