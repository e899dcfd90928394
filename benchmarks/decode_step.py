"""Where a batch-1 decoding step's time goes: the one-token step compiled three ways, and the sampling loop around it.

    python benchmarks/decode_step.py                      # quickstart and 23M shapes, float32 and int8
    python benchmarks/decode_step.py --shapes quickstart --precisions int8 --rounds 5
    python benchmarks/decode_step.py --eager                # the step uncompiled (generate without --compile)

For each shape (random weights) and precision (model/precision.py), greedy, a 150-token prompt and 256 new tokens,
tokens/s of `sampling.sample` with the step compiled:
- `torch.compile`: Transformer.compile_decoding(), Dynamo checking its guards before every call;
- `skip guards`: the same inside `torch.compiler.set_stance(skip_guard_eval_unsafe=True)`;
- `ahead of time`: model/exported_step.py (AOTInductor), what `generate --compile` and `serve` use on a CPU;
and for the ahead-of-time step, its library called alone in a loop (no sampling, no Python around it), which bounds
what the rest of the loop costs. Interleaved rounds, best of --rounds; greedy tokens checked against torch.compile's.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from generate_speed import QUICKSTART_SHAPE, SEED_CONFIG, _cpu_kind, build, prompt_for, time_ours  # noqa: E402

from tinystories.model.exported_step import ExportedStep  # noqa: E402
from tinystories.model.precision import Precision, apply_precision  # noqa: E402

SHAPES = {"quickstart": QUICKSTART_SHAPE, "23M": SEED_CONFIG}


def step_alone(model, prompt: list[list[int]], new: int) -> float:
    """Tokens/s of the compiled library called `new` times after the prompt, the same token each time."""
    step = model.exported_step
    with torch.inference_mode():
        cache = model.new_cache(1)
        model.decode(torch.tensor(prompt), cache)
        n = len(prompt[0])
        tok, pos = torch.tensor([[5]]), torch.tensor([n])
        t = time.perf_counter()
        for i in range(new):
            step.runner(tok, pos, step._span[: n + 1 + i], cache.k, cache.v)
        return new / (time.perf_counter() - t)


def eager_only(shape: str, name: str, args) -> None:
    """The step not compiled (`generate` without --compile): tokens/s, greedy tokens against float32's."""
    cfg = SHAPES[shape]
    model, ref = apply_precision(build(cfg), Precision(name)), build(cfg)
    prompt = prompt_for(model, 150, 1)
    best = 0.0
    for _ in range(args.rounds):
        tps, ids = time_ours(model, prompt, args.new_tokens, True)
        best = max(best, tps)
    _, want = time_ours(ref, prompt, args.new_tokens, True)
    print(f"| {shape} | {name} | {best:,.0f} | {sum(a == b for a, b in zip(ids, want))}/{len(want)} |", flush=True)


def one(shape: str, name: str, args) -> None:
    cfg = SHAPES[shape]
    compiled = apply_precision(build(cfg), Precision(name)).compile_decoding()
    ahead = apply_precision(build(cfg), Precision(name))
    ahead.exported_step = ExportedStep(ahead, ahead.decoding_capacity, ahead.cache_dtype)
    prompt = prompt_for(compiled, 150, 1)
    for m in (compiled, ahead):
        time_ours(m, prompt, 8, True)  # compile and warm up
    best = dict.fromkeys(["torch.compile", "skip guards", "ahead of time", "ahead of time, step alone"], 0.0)
    same = True
    for _ in range(args.rounds):
        tps, ref = time_ours(compiled, prompt, args.new_tokens, True)
        best["torch.compile"] = max(best["torch.compile"], tps)
        with torch.compiler.set_stance("default", skip_guard_eval_unsafe=True):
            tps, ids = time_ours(compiled, prompt, args.new_tokens, True)
        best["skip guards"], same = max(best["skip guards"], tps), same and ids == ref
        tps, ids = time_ours(ahead, prompt, args.new_tokens, True)
        best["ahead of time"], same = max(best["ahead of time"], tps), same and ids == ref
        best["ahead of time, step alone"] = max(best["ahead of time, step alone"],
                                                step_alone(ahead, prompt, args.new_tokens))
    cells = " | ".join(f"{v:,.0f}" for v in best.values())
    print(f"| {shape} | {name} | {cells} | {'yes' if same else 'NO'} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    ap.add_argument("--precisions", nargs="+", choices=["float32", "bfloat16", "int8"], default=["float32", "int8"])
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eager", action="store_true", help="time the step uncompiled only (generate without --compile)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"load {os.getloadavg()[0]:.1f}; {_cpu_kind()}; torch {torch.__version__}, {args.threads} threads; "
          f"batch 1, greedy, 150-token prompt + {args.new_tokens} new; tokens/s, best of {args.rounds}", flush=True)
    if args.eager:
        print("| shape | precision | eager | greedy tokens equal to float32's |\n|---|---|---:|---:|", flush=True)
        for shape in args.shapes:
            for name in args.precisions:
                eager_only(shape, name, args)
        return
    print("| shape | precision | torch.compile | skip guards | ahead of time | ahead of time, step alone "
          "| same tokens |\n|---|---|---:|---:|---:|---:|---|", flush=True)
    for shape in args.shapes:
        for name in args.precisions:
            one(shape, name, args)


if __name__ == "__main__":
    main()
