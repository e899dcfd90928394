"""quickstart reuses a run in --out only when it was made from the same data, vocabulary and budget."""

from __future__ import annotations

from conftest import DATA_DIR, REPO, TRAIN_HEAD, one_line_error, run_cli
from tinystories.config import load_config, save_config


def test_rerun_with_other_settings_does_not_reuse_the_old_run(tmp_path):
    out = tmp_path / "qs"
    (out / "checkpoints" / "latest").mkdir(parents=True)  # a finished 1-minute run on the data directory
    cfg = load_config(REPO / "configs" / "cpu.yaml", [f"data.source={DATA_DIR}", "tokenizer.vocab_size=4096",
                                                      "train.max_minutes=1"])
    save_config(cfg, out / "config.yaml")
    base = ("quickstart", "--out", out, "--data-dir", tmp_path / "data")
    one_line_error(run_cli(*base, "--data", DATA_DIR, "--minutes", "10"), str(out), "minutes 1.0 (now 10.0)", "--out")
    one_line_error(run_cli(*base, "--data", TRAIN_HEAD, "--minutes", "1"), "data", TRAIN_HEAD.name)
    assert not (tmp_path / "data").exists()  # refused before any tokenizer or cache was built
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "config.yaml"]
