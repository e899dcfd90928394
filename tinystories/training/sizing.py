"""Right-size the CPU model to the machine and the time budget (quickstart).

A time budget buys tokens: tokens/s = this CPU's measured matmul peak (calibrate.py, in the dtype the device
policy trains in) x the share of it a shape reaches (MFU, measured with benchmarks/train_throughput.py) / the
shape's FLOPs per token. The recipe study (benchmarks/recipe_study.py, docs/training-recipe.md) found which shape
reaches the lowest loss for a given number of tokens; `choose_cpu_shape` applies that table to the tokens this
budget buys here and says why in one line.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from tinystories.core.config import ModelConfig


@dataclass(frozen=True)
class Shape:
    name: str
    dim: int
    n_layers: int
    n_heads: int
    mfu_fp32: float  # share of the float32 matmul peak its training step reaches (compiled, batch 16 x 256, Muon)
    mfu_bf16: float  # the same in bfloat16 autocast, against the bf16 peak (AVX512-BF16 / AMX)
    min_tokens: float  # the fewest training tokens at which the study found it beats the next smaller shape

    def overrides(self) -> list[str]:
        # the study's recipe with it: Muon for the block matrices, no dropout (~2 passes over the data)
        return [f"model.dim={self.dim}", f"model.n_layers={self.n_layers}", f"model.n_heads={self.n_heads}",
                "train.optimizer=muon", "model.dropout=0.0"]

    def mfu(self, dtype: torch.dtype) -> float:
        return self.mfu_bf16 if dtype == torch.bfloat16 else self.mfu_fp32

    def flops_per_token(self, vocab: int, seq_len: int = 256) -> float:
        """Training FLOPs per token, the model's own count (built on the meta device: nothing is allocated)."""
        from tinystories.model.transformer import Transformer

        cfg = ModelConfig(vocab_size=vocab, dim=self.dim, n_layers=self.n_layers, n_heads=self.n_heads,
                          max_seq_len=seq_len)
        with torch.device("meta"):
            return Transformer(cfg).flops_per_token()


# smallest first. mfu: measured with benchmarks/train_throughput.py (--compile --optimizer muon, batch 16 x 256, 4K
# vocabulary) on 2 cores of an AMD EPYC with avx512_bf16: float32 with oneDNN/MKL limited to AVX2 (a CPU without
# native bf16) against its 211 GFLOP/s fp32 peak; bfloat16 natively against its ~930 GFLOP/s bf16 peak (bf16
# matmuls this small reach a far smaller share of the peak). min_tokens: from the recipe study
# (docs/training-recipe.md), without native bf16: at 5 minutes dim 192 x 4 beat dim 256 x 6 (both Muon) by 7.0%
# (1.1539 vs 1.2408 bits per byte), at 10 minutes by 0.6% (1.1309 vs 1.1378, when dim 256 x 6 had seen 1.96M
# tokens); a + b ln(tokens) fitted per shape through both budgets crosses at ~11 minutes there, when dim 256 x 6
# has seen ~2.1M tokens (recipe_study.py prints the fit): its min_tokens.
CPU_SHAPES = [
    Shape("dim 192, 4 layers", 192, 4, 6, mfu_fp32=0.637, mfu_bf16=0.278, min_tokens=0),
    Shape("dim 256, 6 layers", 256, 6, 8, mfu_fp32=0.629, mfu_bf16=0.293, min_tokens=2.1e6),
]


def choose_cpu_shape(minutes: float, vocab: int, dtype: torch.dtype, describe_cpu: str) -> tuple[Shape, str]:
    """The shape the study recommends for the tokens `minutes` of training buy on this CPU, and the line that
    says why."""
    from tinystories.model.device import peak_flops

    peak = peak_flops(torch.device("cpu"), dtype)
    choice, tokens = CPU_SHAPES[0], 0.0
    for shape in CPU_SHAPES:
        t = minutes * 60 * peak * shape.mfu(dtype) / shape.flops_per_token(vocab)
        if t >= shape.min_tokens:
            choice, tokens = shape, t
    why = (f"{describe_cpu}, {peak / 1e9:,.0f} GFLOP/s measured ({str(dtype).removeprefix('torch.')}): "
           f"{choice.name}, {vocab / 1000:.0f}K vocab for {minutes:g} min (~{tokens / 1e6:.1f}M tokens)")
    return choice, why


def sized_cpu_config(cfg_path, overrides: list[str], minutes: float, vocab: int):
    """The config at `cfg_path` with the shape and recipe the study recommends for `minutes` of training on this
    CPU (the caller's overrides win over the sizing's), and the line that says why."""
    from tinystories.core.config import load_config
    from tinystories.model.device import choose_policy, detect_caps

    caps = detect_caps(torch.device("cpu"))
    policy = choose_policy(caps, load_config(cfg_path, overrides).train)
    kind = "CPU with native bf16" if caps.cpu_bf16 else "CPU without native bf16"
    shape, why = choose_cpu_shape(minutes, vocab, policy.dtype, kind)
    sized_keys = {o.split("=", 1)[0] for o in shape.overrides()}
    mine = [key for key in (o.split("=", 1)[0] for o in overrides) if key in sized_keys]
    if mine:
        why += f" (yours kept: {', '.join(mine)})"
    return load_config(cfg_path, shape.overrides() + overrides), why


def pick_config(on_gpu: bool) -> Path:
    """The one rule for which shipped config a device gets: the 23M model on a GPU, the CPU config (sized by
    sized_cpu_config) on a CPU."""
    from tinystories.core.config import CONFIG_DIR

    return CONFIG_DIR / ("tinystories-23M.yaml" if on_gpu else "cpu.yaml")


def auto_config(overrides: list[str]):
    """`train --config auto`: configs/tinystories-23M.yaml on a GPU; on a CPU, configs/cpu.yaml sized to this
    machine and its time budget (train.max_minutes). Returns the config and the line that says why."""
    from tinystories.core.config import load_config

    path = pick_config(on_gpu=torch.cuda.is_available())
    cfg = load_config(path, overrides)
    if torch.cuda.is_available():
        return cfg, f"GPU found: configs/{path.name}"
    if not cfg.train.max_minutes:
        return cfg, "no time budget (train.max_minutes) to size for: configs/cpu.yaml as it is"
    vocab = cfg.tokenizer.vocab_size
    if cfg.tokenizer.path:  # an existing tokenizer: its real size
        from tinystories.data.tokenizer import load_tokenizer

        vocab = load_tokenizer(cfg.tokenizer.path).vocab_size
    return sized_cpu_config(path, overrides, cfg.train.max_minutes, vocab)
