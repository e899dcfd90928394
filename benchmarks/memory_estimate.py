"""The peak-memory estimate (tinystories/memory.py) for the seed config, against a measurement.

    python benchmarks/memory_estimate.py                          # estimate; on CUDA also measure (eager)
    python benchmarks/memory_estimate.py --compile                # ... measure with torch.compile too
    python benchmarks/memory_estimate.py --micro-batch 32 --dtype float16
    python benchmarks/memory_estimate.py --cpu-check              # no GPU: measure a small model's CPU peak

It prints the estimate for configs/tinystories-23M.yaml (vocabulary 10,000, the tokenizer it asks for) at the
chosen micro-batch, the micro-batch `pick_micro_batch` would choose on GPUs of common sizes, and then:
- on CUDA: a few real training steps (forward, backward, clip, optimizer step, 2 micro-batches per step) of the
  project's model and optimizer on random tokens, torch.cuda.max_memory_allocated, and the estimate's relative
  error (positive = the estimate is above the measurement);
- with --cpu-check: the same steps for a small model on the CPU, whose peak comes from the profiler's memory
  timeline (the CPU has no max_memory_allocated).
"""

from __future__ import annotations

import argparse
import contextlib

import torch

from tinystories.core.config import CONFIG_DIR, TrainConfig, load_config
from tinystories.model.transformer import Transformer
from tinystories.training.memory import GiB, estimate_memory, pick_micro_batch
from tinystories.training.optim import make_optimizer


def run_steps(cfg, micro_batch: int, dtype: torch.dtype, device: torch.device, optimizer: str, compile_: bool,
              steps: int = 3) -> None:
    torch.manual_seed(0)
    model = Transformer(cfg).to(device)
    opt = make_optimizer(model, TrainConfig(optimizer=optimizer), device)
    step_model = torch.compile(model) if compile_ else model
    amp = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()
    for _ in range(steps):
        for _ in range(2):
            buf = torch.randint(0, cfg.vocab_size, (micro_batch, cfg.max_seq_len + 1), device=device)
            with amp:
                _, loss = step_model(buf[:, :-1], buf[:, 1:])
            (loss / 2).backward()
            del buf, loss
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)


def cpu_peak(cfg, micro_batch: int, dtype: torch.dtype, optimizer: str) -> int:
    import numpy as np
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import MemoryProfileTimeline

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        run_steps(cfg, micro_batch, dtype, torch.device("cpu"), optimizer, False, steps=2)
    _, sizes = MemoryProfileTimeline(prof._memory_profile())._coalesce_timeline(torch.device("cpu"))
    return int(np.asarray(sizes).sum(axis=1).max())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(CONFIG_DIR / "tinystories-23M.yaml"))
    ap.add_argument("--micro-batch", type=int, default=None, help="default: the config's train.batch_size")
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--optimizer", default=None, choices=["adamw", "muon"], help="default: the config's")
    ap.add_argument("--compile", action="store_true", help="CUDA: also measure under torch.compile")
    ap.add_argument("--cpu-check", action="store_true", help="measure a small model's peak on the CPU")
    args = ap.parse_args()

    run = load_config(args.config)
    cfg = run.model.model_copy(update={"vocab_size": run.model.vocab_size or run.tokenizer.vocab_size})
    B = args.micro_batch or run.train.batch_size
    optimizer = args.optimizer or run.train.optimizer
    dtype = getattr(torch, args.dtype)
    per_process = run.train.batch_size * run.train.grad_accum
    print(f"config {args.config}: dim {cfg.dim}, {cfg.n_layers} layers, context {cfg.max_seq_len}, vocab "
          f"{cfg.vocab_size}, optimizer {optimizer}; {per_process} sequences per step on one GPU")
    est = estimate_memory(cfg, B, dtype, optimizer=optimizer)
    print(est.describe())
    for gb in (16, 24, 40, 80):
        try:
            b, e = pick_micro_batch(cfg, per_process, gb * 10**9 - 600 * 2**20, dtype, optimizer=optimizer)
            print(f"  a {gb} GB GPU (~600 MiB taken by the CUDA context): micro-batch {b} x {per_process // b} "
                  f"accumulation, estimated peak {e.total / GiB:.2f} GiB")
        except Exception as err:  # UserError: not even 1 fits
            print(f"  a {gb} GB GPU: {err}")

    if torch.cuda.is_available():
        device = torch.device("cuda", 0)
        print(f"GPU: {torch.cuda.get_device_name(device)}, torch {torch.__version__}")
        for compile_ in [False, True] if args.compile else [False]:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            run_steps(cfg, B, dtype, device, optimizer, compile_)
            torch.cuda.synchronize(device)
            peak = torch.cuda.max_memory_allocated(device) - base
            print(f"measured ({'compiled' if compile_ else 'eager'}): max_memory_allocated {peak / GiB:.2f} GiB | "
                  f"estimate {est.total / GiB:.2f} GiB | error {(est.total - peak) / peak:+.1%}")
    elif not args.cpu_check:
        print("no CUDA GPU: nothing measured (--cpu-check measures a small model on the CPU)")
    if args.cpu_check:
        small = cfg.model_copy(update={"dim": 128, "n_layers": 2, "n_heads": 4, "hidden_dim": None,
                                       "max_seq_len": 128, "vocab_size": 4096})
        for b in (1, 8):
            peak = cpu_peak(small, b, dtype, optimizer)
            e = estimate_memory(small, b, dtype, optimizer=optimizer).total
            print(f"CPU check (dim 128, 2 layers, context 128, vocab 4096, micro-batch {b}, {args.dtype}): measured "
                  f"peak {peak / 2**20:.2f} MiB | estimate {e / 2**20:.2f} MiB | error {(e - peak) / peak:+.1%}")


if __name__ == "__main__":
    main()
