"""How many stories the tokenizer needs: bytes per token on held-out text against the size of the training sample.

    python benchmarks/tokenizer_sample.py --from ../shared/data/tinystories --stories 250,500,1000,2316
    python benchmarks/tokenizer_sample.py --from data/raw --stories 10000,30000,100000,300000,1000000

Trains the byte-level BPE that `tokenizer train` trains, on the first N stories of the train text, for each N,
and measures bytes per token (higher is better: fewer tokens for the same text) and training time on the
validation file (text the tokenizer never saw). Where the gain per doubling falls under ~0.5% the sample is big
enough: tokenizer.max_stories is set from this. On a stand-in made by repeating a few thousand stories
(benchmarks/make_corpus.py) the curve stops at the number of distinct stories, so run it on the real download.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from tinystories.data.prepare import held_out_docs
from tinystories.data.text import iter_documents, list_text_files, split_files
from tinystories.data.tokenizer import load_tokenizer, train_bpe


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--from", dest="source", required=True, help="text directory with a validation file")
    ap.add_argument("--stories", default="250,500,1000,2316", help="comma-separated sample sizes")
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--held-out", type=int, default=2000, help="held-out stories to measure on")
    args = ap.parse_args()
    source = Path(args.source)
    train, val = split_files(list_text_files(source))
    held = held_out_docs(source, args.held_out)
    held_bytes = sum(len(d.encode()) for d in held)
    what = "validation file" if val else "last train stories"
    print(f"held-out: {len(held):,} stories, {held_bytes:,} bytes ({what})")
    print(f"{'stories':>10} {'distinct':>9} {'MB':>8} {'vocab':>6} {'bytes/token':>12} {'gain':>7} {'train s':>8}")
    prev = None
    for n in [int(x) for x in args.stories.split(",")]:
        docs = list(iter_documents(train, n))
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.time()
            path = train_bpe(iter(docs), args.vocab_size, Path(tmp))
            secs = time.time() - t0
            tok = load_tokenizer(path)
            tokens = sum(len(ids) for ids in tok.encode_batch(held))
        bpt = held_bytes / tokens
        gain = "" if prev is None else f"{(bpt / prev - 1):+.2%}"
        print(f"{len(docs):>10,} {len(set(docs)):>9,} {sum(len(d.encode()) for d in docs) / 1e6:>8.1f} "
              f"{tok.vocab_size:>6,} {bpt:>12.3f} {gain:>7} {secs:>8.1f}")
        prev = bpt


if __name__ == "__main__":
    main()
