"""The typed run config: validation errors name the key; --set overrides."""

from __future__ import annotations

import pytest

from conftest import REPO, one_line_error, run_cli
from tinystories.core.config import load_config
from tinystories.core.errors import UserError
from tinystories.model.transformer import Transformer


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


def test_set_errors_blame_the_set_not_the_file(tmp_path):
    r = run_cli("train", "--config", "configs/cpu.yaml", "--set", "train.nope=3", "--out", tmp_path / "run")
    line = one_line_error(r, "--set train.nope=3", "unknown key 'train.nope'")
    assert "configs/cpu.yaml" not in line
    with pytest.raises(UserError, match=r"^--set nope\.x=1: unknown key 'nope'"):
        load_config(REPO / "configs" / "cpu.yaml", ["nope.x=1"])
    # a key written by the file is still the file's fault; a section-wide check names both
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  lrr: 0.1\n")
    with pytest.raises(UserError, match=r"c\.yaml: unknown key 'train\.lrr'"):
        load_config(f, ["train.lr=1e-3"])
    with pytest.raises(UserError, match=r"cpu\.yaml with --set model\.dim=100: .*divisible"):
        load_config(REPO / "configs" / "cpu.yaml", ["model.dim=100"])


@pytest.mark.parametrize("item", ["train.max_steps=-1", "train.max_steps=0", "train.max_tokens=0",
                                  "train.epochs=-0.5", "train.max_minutes=0", "train.epochs=.inf",
                                  "data.val_fraction=1.5", "data.val_fraction=-1", "data.val_fraction=1",
                                  "data.max_stories=0", "tokenizer.max_stories=-3"])
def test_out_of_range_values_are_rejected(item):
    key, value = item.split("=")
    with pytest.raises(UserError, match=rf"^--set {item}: invalid value for '{key}': must be"):
        load_config(REPO / "configs" / "cpu.yaml", [item])


@pytest.mark.parametrize("key", ["n_kv_heads", "hidden_dim"])
def test_optional_model_widths_are_null_or_at_least_one(key):
    with pytest.raises(UserError, match=rf"model\.{key}=0 must be >= 1 \(or null: the default\)"):
        load_config(REPO / "configs" / "cpu.yaml", [f"model.{key}=0"])
    assert getattr(load_config(REPO / "configs" / "cpu.yaml", [f"model.{key}=null"]).model, key) is None


def test_run_length_null_and_positive_are_fine():
    cfg = load_config(REPO / "configs" / "cpu.yaml", ["train.max_minutes=null", "train.max_steps=5",
                                                     "data.val_fraction=0", "data.max_stories=1"])
    assert cfg.train.max_minutes is None and cfg.train.max_steps == 5 and cfg.data.val_fraction == 0


def test_cli_run_length_error_is_one_line(tmp_path):
    r = run_cli("train", "--config", "configs/cpu.yaml", "--set", "train.max_steps=-1", "--out", tmp_path / "run")
    one_line_error(r, "--set train.max_steps=-1", "train.max_steps", "positive")
    r = run_cli("train", "--config", "configs/cpu.yaml", "--set", "data.val_fraction=1.5", "--out", tmp_path / "run")
    one_line_error(r, "data.val_fraction", "[0, 1)", "1.5")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("args,needles", [
    (["serve", "--checkpoint", "x", "--port", "abc"], ["tinystories serve", "--port", "'abc'"]),
    (["bogus"], ["invalid choice: 'bogus'"]),
    (["data"], ["tinystories data", "ACTION"]),
    (["data", "prepare", "--from", "x"], ["tinystories data prepare", "--tokenizer"]),
    (["export", "--format", "onnx", "--checkpoint", "x", "--out", "y"], ["--format", "'onnx'"]),
    (["quickstart", "--minutes", "ten"], ["--minutes", "'ten'"]),
])
def test_argument_errors_are_one_line(args, needles):
    line = one_line_error(run_cli(*args), *needles)
    assert "--help" in line and "usage:" not in line


def test_help_still_shows_examples():
    r = run_cli("train", "--help")
    assert r.returncode == 0 and "examples:" in r.stdout and "--init-from" in r.stdout
