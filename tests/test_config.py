"""The typed run config: validation errors name the key; --set overrides."""

from __future__ import annotations

import pytest

from conftest import REPO, run_cli
from tinystories.config import load_config
from tinystories.errors import UserError
from tinystories.model import Transformer


def test_shipped_configs_load_and_seed_model_size():
    seed = load_config(REPO / "configs" / "tinystories-23M.yaml")
    assert (seed.model.dim, seed.model.n_layers, seed.model.n_heads, seed.model.max_seq_len) == (448, 7, 7, 512)
    assert (seed.train.batch_size, seed.train.grad_accum, seed.train.epochs) == (64, 4, 5)
    assert (seed.train.beta1, seed.train.beta2, seed.train.lr) == (0.9, 0.95, 5e-4)
    seed.model.vocab_size = 10000
    assert 23e6 <= Transformer(seed.model).num_params() <= 25e6
    load_config(REPO / "configs" / "cpu.yaml")


def test_unknown_key_and_wrong_type(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  lrr: 0.1\n")
    with pytest.raises(UserError, match="unknown key 'train.lrr'"):
        load_config(f)
    f.write_text("model:\n  dim: big\n")
    with pytest.raises(UserError, match="'model.dim'"):
        load_config(f)
    with pytest.raises(UserError, match="divisible"):
        load_config(None, ["model.dim=100", "model.n_heads=3"])


def test_overrides():
    cfg = load_config(REPO / "configs" / "cpu.yaml", ["train.lr=3e-4", "model.n_kv_heads=2", "train.compile=true"])
    assert cfg.train.lr == 3e-4 and cfg.model.n_kv_heads == 2 and cfg.train.compile is True
    with pytest.raises(UserError, match="key=value"):
        load_config(None, ["train.lr"])


def test_cli_config_error_is_one_line(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("model:\n  layers: 3\n")
    r = run_cli("train", "--config", f)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "model.layers" in r.stderr
