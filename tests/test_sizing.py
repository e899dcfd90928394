"""Right-sizing the CPU model (tinystories/sizing.py): the shape the recipe study's table gives for the tokens a
budget buys on a CPU of a given speed, the one line that says why, and `train --config auto`. Unit tests: the
machine's matmul peak is replaced by fixed figures, so they do not depend on the CPU they run on."""

from __future__ import annotations

import pytest
import torch

import tinystories.model.device as device_mod
from tinystories.core.config import CONFIG_DIR, load_config
from tinystories.training.sizing import CPU_SHAPES, auto_config, choose_cpu_shape


@pytest.fixture
def peak(monkeypatch):
    """Set this 'machine's' matmul peak in FLOP/s."""
    def set_peak(flops: float) -> None:
        monkeypatch.setattr(device_mod, "peak_flops", lambda device, dtype=None: flops)
    return set_peak


def tokens_bought(shape, minutes: float, flops: float, vocab: int, dtype=torch.float32) -> float:
    return minutes * 60 * flops * shape.mfu(dtype) / shape.flops_per_token(vocab)


def test_a_slow_cpu_gets_the_small_shape_and_a_fast_one_the_larger(peak):
    small, large = CPU_SHAPES[0], CPU_SHAPES[-1]
    assert large.min_tokens > 0 and small.min_tokens == 0
    # the peak at which 10 minutes buy the larger shape exactly its min_tokens
    edge = large.min_tokens / tokens_bought(large, 10, 1.0, 4096)
    peak(0.5 * edge)
    shape, why = choose_cpu_shape(10, 4096, torch.float32, "CPU without native bf16")
    assert shape == small
    assert why.startswith(f"CPU without native bf16, {0.5 * edge / 1e9:,.0f} GFLOP/s measured (float32): "
                          f"{small.name}, 4K vocab for 10 min")
    assert f"~{tokens_bought(small, 10, 0.5 * edge, 4096) / 1e6:.1f}M tokens" in why
    peak(2 * edge)
    assert choose_cpu_shape(10, 4096, torch.float32, "CPU without native bf16")[0] == large
    # the same fast machine with a short budget: the small shape again
    assert choose_cpu_shape(2, 4096, torch.float32, "CPU without native bf16")[0] == small
    # bf16 reaches a smaller share of its (higher) peak: the tokens bought use the bf16 share
    bf16_edge = large.min_tokens / tokens_bought(large, 10, 1.0, 4096, torch.bfloat16)
    peak(0.9 * bf16_edge)
    assert choose_cpu_shape(10, 4096, torch.bfloat16, "CPU with native bf16")[0] == small
    peak(1.1 * bf16_edge)
    assert choose_cpu_shape(10, 4096, torch.bfloat16, "CPU with native bf16")[0] == large


def test_auto_config_sizes_cpu_yaml_and_keeps_the_users_settings(peak, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    peak(1e9)  # a very slow CPU: the smallest shape, with the study's recipe
    cfg, why = auto_config(["train.max_minutes=5", "tokenizer.vocab_size=4096"])
    small = CPU_SHAPES[0]
    assert (cfg.model.dim, cfg.model.n_layers, cfg.model.n_heads) == (small.dim, small.n_layers, small.n_heads)
    assert cfg.train.optimizer == "muon" and cfg.model.dropout == 0.0 and cfg.train.max_minutes == 5
    assert small.name in why and "yours kept" not in why
    cfg, why = auto_config(["train.max_minutes=5", "model.dim=128", "model.n_heads=4", "train.optimizer=adamw"])
    assert (cfg.model.dim, cfg.model.n_heads, cfg.train.optimizer) == (128, 4, "adamw")
    assert why.endswith("(yours kept: model.dim, model.n_heads, train.optimizer)")
    unsized = ["train.max_minutes=null", "train.max_steps=100"]
    cfg, why = auto_config(unsized)
    assert why.startswith("no time budget") and cfg == load_config(CONFIG_DIR / "cpu.yaml", unsized)
