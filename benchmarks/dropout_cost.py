"""What dropout costs a compiled CPU training step, and what drawing its masks with ATen's generator saves.

Three variants of the quickstart's model (dim 192 x 4, batch 16 x 256, Muon) are compiled in one process and timed
interleaved, so a machine's drift hits all of them alike: dropout 0, dropout 0.1 with Inductor's own random
generator, and dropout 0.1 with ATen's (`fallback_random`, what training uses on a CPU). Prints the median step.

    python benchmarks/dropout_cost.py --dtype bfloat16
    ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 python benchmarks/dropout_cost.py --dtype float32
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from tinystories.core.config import RunConfig
from tinystories.core.machine import cpu_name
from tinystories.model.device import autocast_ctx, pick_dtype
from tinystories.model.transformer import Transformer
from tinystories.training.optim import make_optimizer

VARIANTS = (("dropout 0", 0.0, False), ("dropout 0.1, Inductor's generator", 0.1, False),
            ("dropout 0.1, ATen's generator (fallback_random)", 0.1, True))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--rounds", type=int, default=6, help="interleaved rounds of 4 timed steps per variant")
    args = ap.parse_args()
    cpu, dtype = torch.device("cpu"), pick_dtype(args.dtype, torch.device("cpu"))
    runs = []
    for name, p, fallback in VARIANTS:
        cfg = RunConfig.model_validate({
            "model": {"vocab_size": 4096, "dim": 192, "n_layers": 4, "n_heads": 6, "max_seq_len": 256, "dropout": p},
            "train": {"batch_size": 16, "dtype": args.dtype, "optimizer": "muon", "muon_weight_decay": 0.2}})
        torch.manual_seed(0)
        model = Transformer(cfg.model)
        runs.append((name, model, torch.compile(model, options={"fallback_random": fallback}),
                     make_optimizer(model, cfg.train, cpu), []))
    x = torch.randint(0, 4096, (16, 257))
    for r in range(args.rounds + 1):  # round 0 compiles and warms up
        for _, model, step_model, opt, times in runs:
            for _ in range(4 if r else 2):
                t0 = time.perf_counter()
                with autocast_ctx(cpu, dtype):
                    _, loss = step_model(x[:, :-1], x[:, 1:])
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)
                if r:
                    times.append(time.perf_counter() - t0)
    print(f"CPU: {cpu_name()}, {torch.get_num_threads()} threads; {args.dtype}")
    base = statistics.median(runs[0][4])
    for name, *_, times in runs:
        med = statistics.median(times)
        print(f"  {name:<48} median {med * 1000:7.1f} ms ({med / base - 1:+.0%})")


if __name__ == "__main__":
    main()
