"""Inference precision: the weights `generate`, `eval` and `serve` run with, and why (`--dtype`).

`choose_precision(caps, pref)` is a pure function of what the device can do (`device.DeviceCaps`, built by hand in
tests; `device.detect_caps` reads the machine) and of `--dtype` (auto | float32 | bfloat16 | int8).
`apply_precision(model, precision)` converts a loaded float32 model in place; `inference_precision(...)` does both.

| device | auto | why |
|---|---|---|
| any CPU, decoding (compiled or eager) | int8 weight-only (torchao), bf16 activations | measured fastest |
| any CPU, scoring (`eval`'s bits per byte) | float32 | the model's own figure |
| CUDA with bf16 (compute capability >= 8.0) | bfloat16 | native bf16 |
| other CUDA GPUs, MPS | float32 | no measured gain |

A batch-1 decoding step on a CPU reads every weight once, so its speed is the speed of the weight reads:
float32 matrix-vector products run at ~9 GB/s on an AMD EPYC (Zen 4) through MKL, bfloat16 through oneDNN is
1.4x faster and torch's int8 weight-only kernel (`_weight_int8pack_mm`) with bf16 activations 4-5x
(benchmarks/generate_speed.py --vs-llama-cpp, docs/results.md); uncompiled, int8 is 1.7-2.7x float32
(benchmarks/decode_step.py --eager). That kernel is slow with float32 activations, so
int8 runs its activations in bf16 on every CPU: with native bf16 they are converted in hardware, without it in a
few AVX2 instructions; the matrix products accumulate in float32 either way.

bfloat16: every weight and activation in bf16 (norms, rotary, attention scores and the softmax of sampling in
float32); the compiled one-token step is built with Inductor's `freezing`, which folds the weights into the graph
and prepacks them for oneDNN's bf16 kernels. int8: the bf16 model with torchao's `Int8WeightOnlyConfig` on every
linear layer whose input size is a multiple of 16 (per-row scales; the embedding stays bf16; a tied output matrix
gets its own int8 copy); on CUDA the activations stay float32. Eager products (a prompt's, and steps that are not
compiled) call torch's int8 kernel themselves (`Int8Linear`): torchao's eager path is a bf16 matmul, slow without
native bf16.

Tolerances the `auto` choices keep (measured by benchmarks/generate_speed.py --vs-llama-cpp, checked by
tests/test_precision.py): bits per byte within `BPB_TOLERANCE` of float32 on the validation text, and greedy text
equal to float32's for its first `GREEDY_TOKENS` tokens after at least `GREEDY_MIN_EQUAL` of the 10 story openings
(stories260K, 65,536 validation tokens: bf16 +0.06% bits per byte and 9 of 10 openings equal, one departing at
token 7; int8 +0.16% and 8 of 10, departing at tokens 40 and 28; a tiny model trained for 80 steps, whose loops have
near-tied tokens: at least 8 of 10 in each). A precision the device
lacks (bf16 on a CPU or GPU without native bf16, int8 outside CPU and CUDA) is a one-line error, not a slow run.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

from tinystories.core.defaults import INFERENCE_DTYPES as PRECISIONS
from tinystories.core.errors import UserError
from tinystories.model.device import DeviceCaps, cpu_has_bf16, detect_caps
from tinystories.model.transformer import Transformer

BPB_TOLERANCE = {"float32": 0.0, "bfloat16": 0.005, "int8": 0.01}  # relative change of bits per byte vs float32
GREEDY_TOKENS = 50  # greedy text compared with float32's over this many tokens after each of the 10 OPENINGS,
GREEDY_MIN_EQUAL = 8  # and equal for at least this many of them
INT8_ALIGN = 16  # int8 weights only for layers whose input size is a multiple of this (see _int8_layer)
BF16_MATMUL_ROWS = 32  # eager int8 products of this many rows or more run a bf16 matmul on a CPU with native bf16


@dataclass(frozen=True)
class Precision:
    """The weights' precision and why it was chosen."""

    name: str  # float32 | bfloat16 | int8
    reason: str = ""

    @property
    def activations(self) -> torch.dtype:
        """The dtype of activations and the KV cache."""
        return torch.float32 if self.name == "float32" else torch.bfloat16

    @property
    def compile_options(self) -> dict:
        """Inductor options for the compiled one-token step."""
        return {"freezing": True} if self.name == "bfloat16" else {}

    def describe(self) -> str:
        """One line: `precision bfloat16 (auto: native bf16 on this CPU, avx512_bf16)`."""
        return f"precision {self.name}" + (f" ({self.reason})" if self.reason else "")


def _onednn_limit() -> str:
    limit = os.environ.get("ONEDNN_MAX_CPU_ISA")
    return f", oneDNN limited to {limit}" if limit else ""


def _auto(caps: DeviceCaps, scoring: bool = False) -> Precision:
    if caps.type == "cpu" and scoring:
        return Precision("float32", "auto: scoring reports the model's own bits per byte, in float32")
    if caps.type == "cpu":
        isa = caps.cpu_bf16 or caps.cpu_isa
        return Precision("int8", f"auto: int8 weights read a quarter of the bytes per token, the fastest measured "
                                 f"on CPUs with and without native bf16{f'; this one: {isa}' if isa else ''}"
                                 f"{_onednn_limit()}")
    if caps.type == "cuda" and caps.cuda_bf16:
        return Precision("bfloat16", f"auto: native bf16 on {caps.label}")
    return Precision("float32", f"auto: no faster precision measured on {caps.label}")


def choose_precision(caps: DeviceCaps, pref: str = "auto", scoring: bool = False) -> Precision:
    """The precision for `caps` given --dtype `pref` (`scoring`: for `eval`'s bits per byte, not for decoding);
    UserError for one the device lacks."""
    if pref == "auto":
        return _auto(caps, scoring)
    if pref not in PRECISIONS:
        raise UserError(f"--dtype {pref}: use one of {', '.join(PRECISIONS)}")
    if pref == "bfloat16":
        native = {"cpu": bool(caps.cpu_bf16), "cuda": caps.cuda_bf16, "mps": caps.mps_bf16}.get(caps.type, False)
        if not native:
            where = f"this CPU{_onednn_limit()}" if caps.type == "cpu" else caps.label
            raise UserError(f"--dtype bfloat16: {where} has no native bf16 (it would be slower than float32); use "
                            f"--dtype int8, float32 or auto")
    if pref == "int8" and caps.type not in ("cpu", "cuda"):
        raise UserError(f"--dtype int8: no int8 weight-only kernels on {caps.label}; use --dtype float32 or auto")
    return Precision(pref, "--dtype")


class Int8Linear(nn.Linear):
    """A CPU linear layer whose weight is torchao's int8 weight-only tensor (per-row scales, no bias).

    Compiled (the one-token step), it is torchao's linear: the weight converted to bf16 inside a matmul, which
    Inductor rewrites into torch's int8 weight-only kernel (`_weight_int8pack_mm`). Eager, torchao runs that matmul
    as written, in bf16: 5x slower than the int8 kernel on a CPU without native bf16 (a 150-token prompt of the
    quickstart model took 53 ms against 17 on an AMD EPYC Zen 4 with oneDNN and MKL limited to AVX2), and slower
    for a few rows on any CPU. So an eager product calls the int8 kernel itself, except on a CPU with native bf16
    from `bf16_matmul_rows` rows on, where the bf16 matmul is faster (crossover ~32 rows on an AMD EPYC Zen 4:
    115 us either way at 32 rows of the quickstart's q/k/v)."""

    bf16_matmul_rows: int | None = None  # None: the int8 kernel for every eager product

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.size(-1)
        if torch.compiler.is_compiling() or (self.bf16_matmul_rows is not None and rows >= self.bf16_matmul_rows):
            return super().forward(x)
        w = self.weight
        y = torch.ops.aten._weight_int8pack_mm(x.reshape(rows, x.size(-1)).to(torch.bfloat16), w.qdata,
                                               w.scale.reshape(-1).to(torch.bfloat16))
        return y.reshape(*x.shape[:-1], y.size(-1)).to(x.dtype)


def _int8_layer(module: nn.Module, name: str = "") -> bool:
    """Whether a layer gets int8 weights: a linear layer whose input size is a multiple of INT8_ALIGN. torch
    2.13's int8 weight-only kernel crashes the process (SIGSEGV) on two or more rows of other sizes, e.g.
    stories260K's FFN (172); such layers keep bf16 weights."""
    return type(module) is nn.Linear and module.in_features % INT8_ALIGN == 0


def apply_precision(model: Transformer, precision: Precision) -> Transformer:
    """Convert a float32 model's weights to `precision`, in place (inference only: no training afterwards)."""
    on_cpu = model.tok_embeddings.weight.device.type == "cpu"
    if precision.name == "bfloat16" or (precision.name == "int8" and on_cpu):  # CUDA int8: float32 activations
        for p in model.parameters():  # not .to(dtype): the complex rotary table stays as it is
            p.data = p.data.to(torch.bfloat16)
    if precision.name == "int8":
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        quantize_(model, Int8WeightOnlyConfig(), filter_fn=_int8_layer)
        if on_cpu:
            rows = BF16_MATMUL_ROWS if cpu_has_bf16() else None
            for m in [m for m in model.modules() if _int8_layer(m)]:
                m.__class__, m.bf16_matmul_rows = Int8Linear, rows
    model.compile_options = precision.compile_options
    model.precision_name = precision.name
    return model


def inference_precision(model: Transformer, device: torch.device, pref: str = "auto",
                        caps: DeviceCaps | None = None, scoring: bool = False) -> Precision:
    """Choose the precision for `device`, --dtype `pref` and whether the model is `scoring` text (`eval`) rather
    than decoding, and convert `model` to it."""
    precision = choose_precision(caps or detect_caps(device), pref, scoring)
    apply_precision(model, precision)
    return precision
