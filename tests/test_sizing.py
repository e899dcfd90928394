"""Right-sizing the CPU model (tinystories/training/sizing.py): the shape the recipe study's table gives for the
tokens a budget buys at each shape's measured training speed, the dropout the passes over the data call for, the
one line that says why, and `train --config auto`. Unit tests inject the training speeds, so they do not depend on
the CPU they run on; one test times a real (tiny) training step and reads it back from the cache."""

from __future__ import annotations

import pytest
import torch

import tinystories.training.sizing as sizing
from tinystories.core.config import CONFIG_DIR, load_config
from tinystories.training.sizing import (
    CPU_SHAPES,
    FRESH_PASSES,
    MANY_PASSES_DROPOUT,
    MANY_PASSES_MUON_WD,
    MAX_PASSES,
    OVERHEAD_SHARE,
    Regularisation,
    auto_config,
    choose_cpu_shape,
)

SMALL, LARGE = CPU_SHAPES[0], CPU_SHAPES[-1]


def rates(small: float, large: float):
    """A machine on which the small shape trains `small` tokens/s and the large one `large`."""
    return lambda shape: small if shape is SMALL else large


def bought(tokens_per_s: float, minutes: float) -> float:
    return minutes * 60 * (1 - OVERHEAD_SHARE) * tokens_per_s


def test_a_slow_cpu_gets_the_small_shape_and_a_fast_one_the_larger():
    assert LARGE.min_tokens > 0 and SMALL.min_tokens == 0
    edge = LARGE.min_tokens / bought(1.0, 10)  # the large shape's speed at which 10 minutes buy its min_tokens
    shape, reg, why = choose_cpu_shape(10, rates(2 * edge, 0.5 * edge), "CPU without native bf16 (float32)")
    assert shape == SMALL and reg == Regularisation(0.0, 0.0)
    assert why.startswith(f"CPU without native bf16 (float32), training measured at 192 x 4 {2 * edge / 1000:.1f}K "
                          f"tok/s, 256 x 6 {0.5 * edge / 1000:.1f}K tok/s: {SMALL.name} for 10 min "
                          f"(~{bought(2 * edge, 10) / 1e6:.1f}M tokens)")
    assert why.endswith("no regularisation (the data's size is not known yet)")
    assert choose_cpu_shape(10, rates(4 * edge, 1.1 * edge), "x")[0] == LARGE
    assert choose_cpu_shape(2, rates(4 * edge, 1.1 * edge), "x")[0] == SMALL  # the same machine, a short budget


def test_passes_over_the_data_set_the_regularisation():
    speed = 8000.0  # tokens/s of both shapes: 10 minutes buy 4.56M tokens, the large shape
    tokens = bought(speed, 10)
    shape, reg, why = choose_cpu_shape(10, rates(speed, speed), "x", data_tokens=tokens / 2)
    assert shape == LARGE and reg == Regularisation(0.0, 0.0) and why.endswith(
        f"2.0 passes over the data: no dropout or weight decay (<= {FRESH_PASSES:g} passes read as fresh text)")
    _, reg, why = choose_cpu_shape(10, rates(speed, speed), "x", data_tokens=tokens / 8)
    assert reg == Regularisation(MANY_PASSES_DROPOUT, MANY_PASSES_MUON_WD)
    assert reg.dropout > 0 and reg.muon_weight_decay > 0
    assert f"8.0 passes over the data: dropout {reg.dropout:g}, Muon weight decay {reg.muon_weight_decay:g}" in why
    # the edge itself reads as fresh text
    assert choose_cpu_shape(10, rates(speed, speed), "x", data_tokens=tokens / FRESH_PASSES)[1] == Regularisation()
    # far more passes than the text is worth: the run stops at MAX_PASSES, its schedule fitted to them
    _, reg, why = choose_cpu_shape(10, rates(speed, speed), "x", data_tokens=tokens / (2 * MAX_PASSES))
    assert reg == Regularisation(MANY_PASSES_DROPOUT, MANY_PASSES_MUON_WD, MAX_PASSES)
    assert f"train.max_passes={MAX_PASSES:g}" in reg.overrides()
    assert why.endswith(f"; the run stops after {MAX_PASSES:g} passes (more repeats of this text only memorise it)")
    assert choose_cpu_shape(10, rates(speed, speed), "x", data_tokens=tokens / MAX_PASSES)[1].max_passes is None


def test_auto_config_sizes_cpu_yaml_and_keeps_the_users_settings(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(sizing, "training_rate", lambda shape, *a, **k: 100.0)  # a very slow CPU: the small shape
    cfg, why = auto_config(["train.max_minutes=5", "tokenizer.vocab_size=4096"])
    assert (cfg.model.dim, cfg.model.n_layers, cfg.model.n_heads) == (SMALL.dim, SMALL.n_layers, SMALL.n_heads)
    assert cfg.train.optimizer == "muon" and cfg.model.dropout == 0.0 and cfg.train.max_minutes == 5
    assert cfg.train.muon_weight_decay == 0.0
    assert SMALL.name in why and "yours kept" not in why
    cfg, why = auto_config(["train.max_minutes=5", "model.dim=128", "model.n_heads=4", "train.optimizer=adamw"])
    assert (cfg.model.dim, cfg.model.n_heads, cfg.train.optimizer) == (128, 4, "adamw")
    assert why.endswith("(yours kept: model.dim, model.n_heads, train.optimizer)")
    # a local text that the budget reads many times over: dropout, from its size on disk
    text = tmp_path / "stories.txt"
    text.write_text("Once upon a time there was a cat.\n" * 100)  # 3.5 KB, ~850 tokens; 5 min buy 28.5K
    cfg, why = auto_config(["train.max_minutes=5", f"data.source={text}"])
    assert (cfg.model.dropout, cfg.train.muon_weight_decay) == (MANY_PASSES_DROPOUT, MANY_PASSES_MUON_WD)
    assert f"passes over the data: dropout {MANY_PASSES_DROPOUT:g}, Muon weight decay" in why
    unsized = ["train.max_minutes=null", "train.max_steps=100"]
    cfg, why = auto_config(unsized)
    assert why.startswith("no time budget") and cfg == load_config(CONFIG_DIR / "cpu.yaml", unsized)


@pytest.mark.slow
def test_training_rate_is_measured_once_per_machine(monkeypatch, tmp_path):
    import tinystories.model.calibrate as calibrate

    monkeypatch.setenv("TINYSTORIES_CACHE", str(tmp_path))
    monkeypatch.setattr(calibrate, "BUSY_SHARE", 0.0)  # keep the figure even on a busy machine
    monkeypatch.setattr(calibrate.os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    cfg = load_config(CONFIG_DIR / "cpu.yaml", ["train.batch_size=2", "model.max_seq_len=32"])
    tiny = sizing.Shape("dim 32, 1 layer", 32, 1, 2, min_tokens=0)
    said = []
    rate = sizing.training_rate(tiny, 256, cfg, torch.float32, compile=False, log=lambda *a, **k: said.append(a))
    assert rate > 0 and len(said) == 1 and "timing the training step of dim 32, 1 layer" in said[0][0]
    assert len(list(tmp_path.glob("train-rate-*.json"))) == 1
    again = sizing.training_rate(tiny, 256, cfg, torch.float32, compile=False, log=lambda *a, **k: said.append(a))
    assert again == rate and len(said) == 1  # read back: not timed again
    other = sizing.training_rate(tiny, 512, cfg, torch.float32, compile=False, log=lambda *a, **k: said.append(a))
    assert other > 0 and len(said) == 2  # another vocabulary is another measurement


def test_the_measurements_own_load_does_not_keep_it_from_the_cache(tmp_path, monkeypatch):
    # the 1-minute load average after a measurement is mostly the measurement: other work is what was there before
    from tinystories.model import calibrate

    monkeypatch.setenv("TINYSTORIES_CACHE", str(tmp_path))
    monkeypatch.setattr(calibrate, "BUSY_SHARE", 0.0)
    measuring = []
    monkeypatch.setattr(calibrate.os, "getloadavg", lambda: (8.0 if measuring else 0.0, 0.0, 0.0))
    assert calibrate.cached_measure("test-load", "k", lambda: measuring.append(1) or 2.0) == 2.0
    assert calibrate.cached_measure("test-load", "k", lambda: measuring.append(1) or 3.0) == 2.0  # read back
    measuring.clear()
    monkeypatch.setattr(calibrate.os, "getloadavg", lambda: (8.0, 0.0, 0.0))  # busy before: used once, not kept
    assert calibrate.cached_measure("test-load", "other", lambda: 4.0) == 4.0
    assert calibrate.cached_measure("test-load", "other", lambda: 5.0) == 5.0


def test_a_measurement_leaves_the_global_random_state_alone(tmp_path, monkeypatch):
    # a resumed run re-measures when the machine was busy (nothing cached); its restored random state must survive
    import torch

    from tinystories.model import calibrate

    monkeypatch.setenv("TINYSTORIES_CACHE", str(tmp_path))
    torch.manual_seed(7)
    before = torch.random.get_rng_state()
    value = calibrate.cached_measure("test-rng", "k", lambda: float(torch.randn(4).sum()) * 0 + 1.0)
    assert value == 1.0 and torch.equal(torch.random.get_rng_state(), before)
