"""How strong should decoding's word bias be? Inclusion of requested words against the grammar of the sentences
that hold them, for a model trained with data.format=instruct (the "request" condition of `eval --instruct`).

    python benchmarks/instruct_bias.py --checkpoint runs/instruct \
        --text ../shared/data/tinystories/TinyStories-valid-head.txt --bias 4 6 8 12

The requests come from the stories of --text that `eval --instruct` does not draw (its 30 evenly spaced picks are
left out), so that the default bias is chosen on text other than the text its figures are reported on.
"""

from __future__ import annotations

import argparse
import itertools
import json

from tinystories.data import requests
from tinystories.data.requests import AFTER_PUSH, BIAS_RANK, CANDIDATES, request_lines
from tinystories.evaluation.instruct import answer, follow_figures, grammar_figures, held_out_requests
from tinystories.inference.sampling import SamplingParams
from tinystories.model.checkpoint import load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--text", required=True)
    ap.add_argument("--bias", type=float, nargs="+", default=[2.0, 4.0, 8.0])
    ap.add_argument("--plausible", type=int, nargs="+", default=[BIAS_RANK],
                    help="ranks a word's first token must reach before it is pushed (0: always pushed)")
    ap.add_argument("--candidates", type=int, nargs="+", default=[CANDIDATES],
                    help="stories drawn per request, the best kept (sampling.pick_candidate)")
    ap.add_argument("--after", type=int, nargs="+", default=[AFTER_PUSH],
                    help="tokens after each pushed word that the choice among candidates also weighs")
    ap.add_argument("--num-stories", type=int, default=30)
    ap.add_argument("--max-new-tokens", type=int, default=200)
    ap.add_argument("--reported", action="store_true",
                    help="use the requests `eval --instruct` reports on (default: the other stories of --text, so "
                         "that the bias is not chosen on what is reported)")
    args = ap.parse_args()
    model, ck = load_model(args.checkpoint, "cpu")
    reqs = held_out_requests(args.text, args.num_stories, tuning=not args.reported)
    for b, rank, n, after in itertools.product(args.bias, args.plausible, args.candidates, args.after):
        requests.BIAS_RANK = rank  # read by sampling.request_bias (which applies it to best-of-N only)
        requests.AFTER_PUSH = after  # read by sampling.naturalness
        params = SamplingParams(max_new_tokens=args.max_new_tokens)
        answers = answer(model, ck.tokenizer, reqs, request_lines, b, params, n)
        figs = follow_figures(answers) | grammar_figures(answers)
        print(json.dumps({"word_bias": b, "plausible": rank, "candidates": n, "after": after,
                          **{k: round(v, 3) if isinstance(v, float) else v for k, v in figs.items()}}), flush=True)


if __name__ == "__main__":
    main()
