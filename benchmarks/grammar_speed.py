"""Grammar parser speed: sentences per second through link-parser (tinystories.evaluation.grammar), on real
sentences of the shared valid head, with 1 worker process and with the default (min(2, CPU count)).
Start-up is included.

    python benchmarks/grammar_speed.py --lines 300
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from tinystories.evaluation.grammar import PARSED, TIMED_OUT, check_sentences, find_parser
from tinystories.evaluation.story_stats import sentences

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared"
VALID_HEAD = SHARED / "data" / "tinystories" / "TinyStories-valid-head.txt"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lines", type=int, default=300, help="paragraphs of the valid head to split into sentences")
    ap.add_argument("--text", type=Path, default=VALID_HEAD)
    args = ap.parse_args()
    if find_parser() is None:
        raise SystemExit("link-parser not found: apt-get install link-grammar / brew install link-grammar")
    lines = [x for x in args.text.read_text(encoding="utf-8").splitlines() if x.strip()][: args.lines]
    sents = [s for line in lines for s in sentences(line)]
    print(f"{len(sents):,} sentences from {len(lines)} paragraphs of {args.text.name}; {os.cpu_count()} CPUs")
    default = min(2, os.cpu_count() or 1)
    for workers in sorted({1, default}):
        t0 = time.perf_counter()
        verdicts = check_sentences(sents, workers=workers)
        dt = time.perf_counter() - t0
        print(f"workers {workers}: {len(sents) / dt:,.0f} sentences/s ({dt:.1f} s); "
              f"{verdicts.count(PARSED) / len(sents):.1%} parse completely, {verdicts.count(TIMED_OUT)} timed out")


if __name__ == "__main__":
    main()
