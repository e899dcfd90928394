"""`tinystories doctor`: a healthy fake run passes, a deliberately broken one is flagged (split article tokens,
a cache from another tokenizer, rising validation loss, a wrong lr schedule), an imported checkpoint skips the
checks that need metrics."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from conftest import VALID_HEAD, one_line_error, run_cli
from tinystories.evaluation.doctor import run_checks
from tinystories.training.schedule import lr_at

LR, MIN_LR, WARMUP, TOTAL = 1e-3, 1e-4, 10, 100


@pytest.fixture(scope="module")
def source(stories300) -> Path:
    return stories300


@pytest.fixture(scope="module")
def cache4k(tmp_path_factory, tok4k, source) -> Path:
    from tinystories.data.cache import prepare
    from tinystories.data.tokenizer import load_tokenizer

    path, _ = prepare(load_tokenizer(tok4k), source, tmp_path_factory.mktemp("doccache"), val_fraction=0.1)
    return path


def _config(vocab: int) -> dict:
    return {"model": {"vocab_size": vocab, "dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "max_seq_len": 128},
            "train": {"lr": LR, "min_lr": MIN_LR, "warmup_steps": WARMUP, "max_steps": TOTAL}}


def _metrics(val_losses: list[float], lr_of) -> str:
    lines = []
    for step in range(0, TOTAL, 5):
        lines.append({"kind": "train", "step": step, "tokens": step * 1000, "epoch": step / 50, "loss": 5.0 - step / 50,
                      "lr": lr_of(step), "tokens_per_s": 1e4, "time": step * 0.1})
    for i, v in enumerate(val_losses):
        step = (i + 1) * TOTAL // len(val_losses)
        lines.append({"kind": "val", "step": step, "tokens": step * 1000, "epoch": step / 50, "val_loss": v,
                      "val_ppl": 2.718 ** v, "val_bpb": v / 3, "train_loss": v - 0.05, "lr": lr_of(step)})
    return "".join(json.dumps(m) + "\n" for m in lines) + '{"kind": "train", "step": 1'  # torn last line


def make_run(root: Path, checkpoint: Path, cache: Path, val_losses, lr_of) -> Path:
    """A run directory as the trainer writes it: config.yaml, metrics.jsonl, checkpoints/{latest,best}."""
    import yaml

    run = root
    ckdir = run / "checkpoints"
    ckdir.mkdir(parents=True)
    dest = ckdir / "step-00000100"
    shutil.copytree(checkpoint, dest)
    (dest / "state.json").write_text(json.dumps({"step": TOTAL, "tokens": TOTAL * 1000, "total_steps": TOTAL,
                                                 "cache_dir": str(cache), "metrics": {"val_loss": val_losses[-1]}}))
    for name in ("latest", "best"):
        os.symlink(dest.name, ckdir / name)
    cfg = yaml.safe_load((dest / "config.yaml").read_text())
    cfg["train"].update(_config(0)["train"])
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    (run / "metrics.jsonl").write_text(_metrics(val_losses, lr_of))
    return run


def _cosine(step: int) -> float:
    from tinystories.core.config import RunConfig

    return lr_at(step, RunConfig.model_validate(_config(4096)), TOTAL)


@pytest.fixture(scope="module")
def good_run(tmp_path_factory, random_checkpoint, cache4k) -> Path:
    return make_run(tmp_path_factory.mktemp("good") / "run", random_checkpoint, cache4k,
                    [6.0, 4.5, 3.8, 3.4, 3.2], _cosine)


@pytest.fixture(scope="module")
def broken_run(tmp_path_factory, source, cache4k) -> Path:
    """A 260-entry BPE (" the" split), a cache built with another tokenizer, val loss turning up, constant lr."""
    import torch

    from tinystories.core.config import RunConfig
    from tinystories.data.text import iter_documents
    from tinystories.data.tokenizer import load_tokenizer, train_bpe
    from tinystories.model.checkpoint import write_checkpoint_dir
    from tinystories.model.transformer import Transformer

    root = tmp_path_factory.mktemp("broken")
    tok = load_tokenizer(train_bpe(iter_documents([source]), 260, root / "tok260"))
    assert tok.piece_id("the", True) is None
    cfg = RunConfig.model_validate(_config(tok.vocab_size))
    torch.manual_seed(0)
    write_checkpoint_dir(root / "ck", Transformer(cfg.model), cfg, tok, {"step": 0})
    return make_run(root / "run", root / "ck", cache4k, [5.0, 4.0, 3.5, 3.9, 4.4], lambda step: LR)


def _by_name(checks) -> dict:
    return {c.name: c for c in checks}


def test_good_run_passes(good_run):
    checks = _by_name(run_checks(good_run, samples=0)[0])
    for name in ("article tokens", "cache matches tokenizer", "validation loss", "lr schedule"):
        assert checks[name].status == "PASS", checks[name]
    assert "' the'" in checks["article tokens"].detail and "%" in checks["article tokens"].detail
    assert checks["articles in samples"].status == "SKIP"
    # 4,096 entries for ~60K train tokens: the small-data warning
    assert checks["vocabulary vs data"].status == "WARN" and "smaller vocabulary" in checks["vocabulary vs data"].fix


def test_broken_run_is_flagged(broken_run):
    r = run_cli("doctor", broken_run, "--samples", "0")
    assert r.returncode == 1, r.stderr
    out = r.stdout
    assert "FAIL  article tokens: ' the'" in out
    assert "FAIL  cache matches tokenizer" in out
    assert "FAIL  validation loss: turned up" in out
    assert "FAIL  lr schedule" in out
    assert out.count("fix: ") >= 4 and "--vocab-size 4096" in out and "data prepare --tokenizer" in out
    assert "Traceback" not in r.stderr


def test_samples_check_and_checkpoint_dir(good_run):
    # a checkpoint directory inside a run finds the run's metrics; the sample check compares with real text
    ck = good_run / "checkpoints" / "latest"
    checks = _by_name(run_checks(ck, samples=2, reference=str(VALID_HEAD))[0])
    assert checks["validation loss"].status == "PASS"
    s = checks["articles in samples"]
    assert s.status in ("PASS", "WARN") and "in real stories" in s.detail


def test_imported_checkpoint_skips_metrics(random_checkpoint):
    r = run_cli("doctor", random_checkpoint, "--samples", "0")
    assert r.returncode == 0, r.stderr
    assert "SKIP  validation loss" in r.stdout and "SKIP  lr schedule" in r.stdout
    assert "SKIP  cache matches tokenizer" in r.stdout and "PASS  article tokens" in r.stdout


def test_doctor_bad_input(tmp_path):
    for args in ([tmp_path / "missing"], [tmp_path], [tmp_path, "--samples", "-1"]):
        r = run_cli("doctor", *args)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


def test_overfitting_fix_builds_on_the_runs_dropout():
    from tinystories.core.config import RunConfig
    from tinystories.evaluation.doctor import check_val_loss

    rising = [{"kind": "val", "step": s, "val_loss": v} for s, v in ((100, 3.0), (200, 2.5), (300, 2.9))]
    plain = check_val_loss(rising, RunConfig.model_validate({"model": {"dropout": 0.0}}))
    assert plain.status == "FAIL" and "add model.dropout=0.1" in plain.fix
    regularised = check_val_loss(rising, RunConfig.model_validate({"model": {"dropout": 0.1}}))
    assert "raise model.dropout (now 0.1) to 0.2" in regularised.fix and "add model.dropout" not in regularised.fix
    assert "muon_weight_decay" not in plain.fix  # AdamW: its weight decay is train.weight_decay
    muon = check_val_loss(rising, RunConfig.model_validate({"train": {"optimizer": "muon"}}))
    assert "add train.muon_weight_decay=0.2" in muon.fix
    decayed = RunConfig.model_validate({"train": {"optimizer": "muon", "muon_weight_decay": 0.2}})
    assert "muon_weight_decay" not in check_val_loss(rising, decayed).fix


# --- the grammar check (the real link-parser) -----------------------------------------------------------------------


@pytest.mark.slow
def test_grammar_check_thresholds():
    from tinystories.evaluation.doctor import GRAMMAR_PASS_POINTS, GRAMMAR_WARN_POINTS, check_grammar
    from tinystories.evaluation.grammar import find_parser

    if find_parser() is None:
        pytest.fail("link-parser is not installed: apt-get install link-grammar", pytrace=False)
    real = [x for x in VALID_HEAD.read_text(encoding="utf-8").splitlines() if x.strip()]
    as_samples = lambda texts: [{"prompt": "", "text": t, "ended": True} for t in texts]  # noqa: E731
    same = check_grammar(as_samples(real[100:130]), real)  # other real stories: the same rate, give or take
    assert same.status == "PASS" and "in real stories" in same.detail, same
    broken = "He go home. The dog is run to park the happy very. She were happy because. The girl saw a."
    bad = check_grammar(as_samples([broken, "The dog ran to the park. " + broken]), real)
    assert bad.status == "FAIL" and "points below real text" in bad.detail and "train longer" in bad.fix, bad
    good = ("The dog ran to the park. Lily and Ben played with a red ball. The cat sat on the mat. It was a sunny "
            "day. He wanted to climb the tall tree. The bird flew over the house. They went home and ate some cake. "
            "She was happy because her mom gave her a big hug. Tom had a big red ball. The sun was warm. "
            "Sam wanted to play. Mom was in the kitchen.")
    warn = check_grammar(as_samples([good + " He go home. She were happy because."]), real)  # 12 of 14 parse
    gap = float(warn.detail.split(" points")[0])
    assert warn.status == "WARN" and GRAMMAR_PASS_POINTS < gap <= GRAMMAR_WARN_POINTS, warn
    assert check_grammar(None, real).status == "SKIP"


# --- the lr check per segment of a run; one metrics reader -----------------------------------------------------------


def _lr_line(stdout: str) -> str:
    return next(line for line in stdout.splitlines() if "lr schedule:" in line)


@pytest.mark.slow
def test_lr_check_follows_each_segment_of_a_resumed_run(tmp_path, tok4k, source):
    """A run resumed with --set train.lr (allowed) follows a new schedule from there on: doctor checks each logged
    lr against its own segment's schedule (metrics.jsonl's segment rows), and still catches tampered rates. A
    half-written last line left by a killed run does not break the resumed run's metrics."""
    from conftest import REPO
    from tinystories.training.schedule import Schedule

    run = tmp_path / "run"
    args = ["train", "--config", REPO / "configs" / "cpu.yaml", "--out", run, "--data", source]
    for s in ("model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.max_seq_len=64",
              "train.batch_size=4", "train.max_steps=12", "train.max_minutes=null", "train.warmup_steps=4",
              "train.lr=3e-3", "train.min_lr=3e-4", "train.eval_interval=6", "train.eval_tokens=2048",
              "train.log_interval=1", "train.checkpoint_interval=6", "train.sample_tokens=4",
              "train.dtype=float32", "train.compile=false", f"tokenizer.path={tok4k}",
              f"data.data_dir={tmp_path / 'data'}"):
        args += ["--set", s]
    r = run_cli(*args)
    assert r.returncode == 0, r.stderr[-2000:]
    metrics = run / "metrics.jsonl"
    with open(metrics, "a") as f:
        f.write('{"kind": "train", "step": 13, "lo')  # a write the killed run never finished
    r = run_cli("train", "--resume", run, "--set", "train.lr=1e-3", "--set", "train.min_lr=1e-4",
                "--set", "train.max_steps=20")
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]  # every line whole again
    # the optimizer runs at the rate it logs: the resumed run's groups carry the new base lr, not the saved one
    import torch

    from tinystories.model.checkpoint import read_checkpoint

    ts = torch.load(read_checkpoint(run, prefer="latest").path / "trainer.pt", weights_only=True)
    groups = [g for o in ts["optimizer"].get("optimizers", [ts["optimizer"]]) for g in o["param_groups"]]
    adamw = [g["base_lr"] for g in groups if "ns_steps" not in g]  # Muon's groups follow train.muon_lr
    assert adamw and set(adamw) == {1e-3}, groups
    assert [(p["step"], p["schedule"]["lr"]) for p in rows if p["kind"] == "segment"] == [(0, 3e-3), (12, 1e-3)]
    r = run_cli("doctor", run, "--samples", "0")
    assert r.returncode in (0, 1) and "Traceback" not in r.stderr, r.stderr
    line = _lr_line(r.stdout)
    assert line.startswith("PASS"), r.stdout
    assert "resumed at step 12 with lr 0.003 -> 0.001, min_lr 0.0003 -> 0.0001" in line, line

    # rates that do not follow their segment's schedule: x2 in the resumed segment, or the first segment's schedule
    seg2 = next(i for i, p in enumerate(rows) if p["kind"] == "segment" and p["step"] == 12)
    first = Schedule(lr=3e-3, min_lr=3e-4, warmup_steps=4)
    for tamper in (lambda p: 2 * p["lr"], lambda p: first.lr_at(p["step"] - 1, p["total_steps"])):
        metrics.write_text("".join(json.dumps({**p, "lr": tamper(p)} if i > seg2 and p["kind"] == "train" else p)
                                   + "\n" for i, p in enumerate(rows)))
        r = run_cli("doctor", run, "--samples", "0")
        assert r.returncode == 1 and _lr_line(r.stdout).startswith("FAIL"), r.stdout


def test_old_runs_without_segment_rows_are_checked_as_before(good_run, broken_run):
    # good_run's and broken_run's metrics have no segment rows: checked against the run's config
    assert _by_name(run_checks(good_run, samples=0)[0])["lr schedule"].status == "PASS"
    assert _by_name(run_checks(broken_run, samples=0)[0])["lr schedule"].status == "FAIL"


def test_doctor_reads_a_torn_last_line_and_rejects_a_corrupt_middle_line(good_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(good_run, run, symlinks=True)
    text = (run / "metrics.jsonl").read_text()
    assert not text.endswith("\n")  # _metrics ends with a half-written line
    checks = _by_name(run_checks(run, samples=0)[0])
    assert checks["lr schedule"].status == "PASS" and checks["validation loss"].status == "PASS"
    lines = text.splitlines(keepends=True)
    (run / "metrics.jsonl").write_text("".join(lines[:3]) + '{"kind": "train", "st\n' + "".join(lines[3:]))
    one_line_error(run_cli("doctor", run, "--samples", "0"), f"{run / 'metrics.jsonl'}:4")
