"""Training throughput of the project's own model and optimizer on random tokens.

Times full training steps (forward, backward, clip, AdamW step) and prints the median after warm-up.
The last line is `tokens_per_s=<number>`.

    python benchmarks/train_throughput.py --dim 448 --n-layers 7 --n-heads 7 --hidden-dim 1216 \
        --vocab-size 10000 --seq-len 512 --batch-size 8 --steps 10
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from tinystories.core.config import RunConfig
from tinystories.model.device import autocast_ctx, peak_flops, pick_dtype
from tinystories.model.transformer import Transformer
from tinystories.training.optim import make_optimizer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dim", type=int, default=288)
    ap.add_argument("--n-layers", type=int, default=6)
    ap.add_argument("--n-heads", type=int, default=6)
    ap.add_argument("--n-kv-heads", type=int, default=None)
    ap.add_argument("--hidden-dim", type=int, default=None)
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=10, help="timed steps (after --warmup)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--optimizer", default="adamw", choices=["adamw", "muon"])
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    cfg = RunConfig.model_validate({
        "model": {"vocab_size": args.vocab_size, "dim": args.dim, "n_layers": args.n_layers, "n_heads": args.n_heads,
                  "n_kv_heads": args.n_kv_heads, "hidden_dim": args.hidden_dim, "max_seq_len": args.seq_len},
        "train": {"batch_size": args.batch_size, "dtype": args.dtype, "compile": args.compile,
                  "optimizer": args.optimizer},
    })
    device = torch.device(args.device)
    dtype = pick_dtype(args.dtype, device)
    torch.manual_seed(0)
    model = Transformer(cfg.model).to(device)
    opt = make_optimizer(model, cfg.train, device)
    step_model = torch.compile(model) if args.compile else model
    amp = autocast_ctx(device, dtype)
    x = torch.randint(0, args.vocab_size, (args.batch_size, args.seq_len + 1), device=device)
    times = []
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        with amp:
            _, loss = step_model(x[:, :-1], x[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    tps = args.batch_size * args.seq_len / med
    print(f"model {model.num_params() / 1e6:.2f}M params | device {device} | "
          f"dtype {str(dtype).removeprefix('torch.')} | optimizer {args.optimizer} | compile {args.compile} | "
          f"threads {torch.get_num_threads()} | batch {args.batch_size} x {args.seq_len}")
    print(f"step median {med * 1000:.1f} ms (min {min(times) * 1000:.1f}, max {max(times) * 1000:.1f}) "
          f"over {len(times)} steps")
    flops = tps * model.flops_per_token()
    peak = peak_flops(device, dtype)
    mfu = f" | MFU {flops / peak:.1%} of the {'measured' if device.type == 'cpu' else 'datasheet'} " \
          f"{str(dtype).removeprefix('torch.')} matmul peak {peak / 1e9:,.0f} GFLOP/s" if peak else ""
    print(f"achieved {flops / 1e9:,.1f} GFLOP/s (6N + attention per token){mfu}")
    print(f"tokens_per_s={tps:.0f}")


if __name__ == "__main__":
    main()
