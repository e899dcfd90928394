"""How many stories does the tokenizer need? Bytes per token on held-out text for BPE tokenizers trained on the
first N stories of a text, N doubling up to all of it.

    python benchmarks/tokenizer_sample.py                      # the shared 2 MB train head, 4K and 10K vocabularies
    python benchmarks/tokenizer_sample.py --text TinyStoriesV2-GPT4-train.txt --stories 1000 200000

Held out: the shared validation head (never in a sample). On the real 2.2 GB file this answers where the default
sample (tokenizer.max_stories: 100,000) sits on the curve; a stand-in built by repeating 2,316 stories cannot
(every sample past 2,316 stories is the same text again).
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
from pathlib import Path

from tinystories.textdata import iter_documents
from tinystories.tokenizer import load_tokenizer, train_bpe

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "tinystories"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--text", type=Path, default=SHARED / "TinyStories-train-head.txt")
    ap.add_argument("--held-out", type=Path, default=SHARED / "TinyStories-valid-head.txt")
    ap.add_argument("--vocab-sizes", type=int, nargs="+", default=[4096, 10000])
    ap.add_argument("--stories", type=int, nargs=2, default=[250, 1_000_000], metavar=("FIRST", "MAX"),
                    help="the smallest sample, and a cap (the sample doubles until it holds every story or the cap)")
    a = ap.parse_args()
    held = a.held_out.read_text(encoding="utf-8")
    held_bytes = len(held.encode("utf-8"))
    docs = list(itertools.islice(iter_documents([a.text]), a.stories[1]))
    sizes, n = [], a.stories[0]
    while n < len(docs):
        sizes.append(n)
        n *= 2
    sizes.append(len(docs))
    print(f"held-out text: {a.held_out.name} ({held_bytes:,} bytes); training text: {a.text.name} "
          f"({len(docs):,} stories read)")
    print(f"{'stories':>9} {'MB':>7} " + " ".join(f"{f'bytes/token @{v}':>17}" for v in a.vocab_sizes))
    for n in sizes:
        sample = docs[:n]
        mb = sum(len(d.encode("utf-8")) for d in sample) / 1e6
        row = []
        for v in a.vocab_sizes:
            with tempfile.TemporaryDirectory() as tmp:
                tok = load_tokenizer(train_bpe(sample, v, Path(tmp)))
                row.append(held_bytes / len(tok.encode(held)))
        print(f"{n:>9,} {mb:>7.2f} " + " ".join(f"{x:>17.3f}" for x in row), flush=True)


if __name__ == "__main__":
    main()
