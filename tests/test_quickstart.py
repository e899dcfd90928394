"""quickstart reuses a run in --out only when it was made from the same data, vocabulary and budget."""

from __future__ import annotations

from conftest import DATA_DIR, REPO, TRAIN_HEAD, one_line_error, run_cli
from tinystories.core.config import load_config, save_config
from tinystories.quickstart import _check_same_request


def _fake_run(out, minutes="1"):
    """A finished-looking quickstart run: its config.yaml and a checkpoints/latest, nothing trained."""
    (out / "checkpoints" / "latest").mkdir(parents=True)
    cfg = load_config(REPO / "configs" / "cpu.yaml", [f"data.source={DATA_DIR}", "tokenizer.vocab_size=4096",
                                                      f"train.max_minutes={minutes}"])
    save_config(cfg, out / "config.yaml")
    return cfg


def test_rerun_with_other_settings_does_not_reuse_the_old_run(tmp_path):
    out = tmp_path / "qs"
    _fake_run(out)
    base = ("quickstart", "--out", out, "--data-dir", tmp_path / "data")
    one_line_error(run_cli(*base, "--data", DATA_DIR, "--minutes", "10"), str(out), "minutes 1 (now 10)",
                   f"--out {out}-10min")
    one_line_error(run_cli(*base, "--data", TRAIN_HEAD, "--minutes", "1"), "data", TRAIN_HEAD.name)
    assert not (tmp_path / "data").exists()  # refused before any tokenizer or cache was built
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "config.yaml"]


def test_same_request_passes_the_check(tmp_path):
    out = tmp_path / "qs"
    cfg = _fake_run(out, minutes="2.5")
    _check_same_request(out, cfg)  # no error: the run would be reused or resumed


def test_checkpoints_without_config_is_a_one_line_error(tmp_path):
    out = tmp_path / "qs"
    (out / "checkpoints" / "latest").mkdir(parents=True)
    one_line_error(run_cli("quickstart", "--out", out, "--data-dir", tmp_path / "data", "--data", DATA_DIR,
                           "--minutes", "1"), str(out), "no config.yaml")
