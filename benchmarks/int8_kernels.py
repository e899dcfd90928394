"""The int8 matrix products PyTorch offers for one decoding row, timed on this CPU.

    python benchmarks/int8_kernels.py
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 python benchmarks/int8_kernels.py

A batch-1 decoding step multiplies one row of activations by each weight matrix. For the matrices of the
quickstart shape (dim 256, FFN 688, 4K vocabulary) and the seed's 23M shape (dim 448, FFN 1200, 10K vocabulary),
microseconds per product, best of 5 rounds:
- `float32`: `F.linear`, float32 weights (MKL);
- `int8 weight-only`: `aten._weight_int8pack_mm`, int8 weights with per-row scales and bf16 activations, the
  kernel the `int8` precision runs (model/precision.py);
- `int8 x int8`: `torch._int_mm`, the activation row quantised to int8 as well (the kernel alone, without the
  quantisation around it), as llama.cpp's q8_0 multiplies;
- `oneDNN qlinear`: `onednn.qlinear_pointwise` on a prepacked weight, uint8 activations (what Inductor's x86
  int8 quantisation lowers to), dequantised to float32 inside.
And the relative error of each int8 product against float32.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from generate_speed import _cpu_kind  # noqa: E402

MATRICES = {"quickstart": [(256, 768), (256, 256), (256, 688), (688, 256), (256, 4096)],
            "23M": [(448, 1344), (448, 448), (448, 1200), (1200, 448), (448, 10000)]}


def best_us(fn, calls: int, rounds: int = 5) -> float:
    """Microseconds per call of fn(), best of `rounds` loops of `calls` calls after a warm-up."""
    for _ in range(20):
        fn()
    best = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - t) / calls)
    return best * 1e6


def products(k: int, n: int, calls: int) -> list[str]:
    """Timings and errors of the four products for one (in, out) matrix."""
    w, x = torch.randn(n, k), torch.randn(1, k)
    ref = x @ w.t()
    scale = w.abs().amax(1) / 127
    wq = (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8)
    xs = float(x.abs().max() / 127)
    xq = (x / xs).round().clamp(-127, 127).to(torch.int8)
    xu = (xq.to(torch.int16) + 128).to(torch.uint8)
    packed = torch.ops.onednn.qlinear_prepack(wq, [1, k])
    zeros = torch.zeros(n, dtype=torch.int64)
    xb, sb = x.to(torch.bfloat16), scale.to(torch.bfloat16)
    runs = {
        "float32": lambda: torch.nn.functional.linear(x, w),
        "int8 weight-only": lambda: torch.ops.aten._weight_int8pack_mm(xb, wq, sb),
        "int8 x int8": lambda: torch._int_mm(xq, wq.t()),
        "oneDNN qlinear": lambda: torch.ops.onednn.qlinear_pointwise(xu, xs, 128, packed, scale, zeros, None, 1.0,
                                                                     0, torch.float32, "none", [], ""),
    }
    outs = {"int8 weight-only": runs["int8 weight-only"]().float(),
            "int8 x int8": runs["int8 x int8"]().float() * xs * scale,
            "oneDNN qlinear": runs["oneDNN qlinear"]()}
    cells = [f"{best_us(fn, calls):.1f}" for fn in runs.values()]
    errs = [f"{((o - ref).norm() / ref.norm()).item():.3f}" for o in outs.values()]
    return cells + errs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=500, help="calls per timed loop")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"load {os.getloadavg()[0]:.1f}; {_cpu_kind()}; torch {torch.__version__}, {args.threads} threads; "
          f"one row x matrix, us per product, best of 5")
    print("| shape | matrix (in x out) | float32 | int8 weight-only | int8 x int8 | oneDNN qlinear "
          "| error: weight-only | int8 x int8 | qlinear |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for shape, mats in MATRICES.items():
        for k, n in mats:
            print(f"| {shape} | {k} x {n} | " + " | ".join(products(k, n, args.calls)) + " |", flush=True)


if __name__ == "__main__":
    main()
