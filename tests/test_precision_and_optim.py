"""float16 training with loss scaling, Muon and the learning-rate schedules, end to end on real data: fp16 tracks
fp32, the GradScaler backs off and skips overflowing steps, kill -9 + --resume is exact in fp16 and with Muon, a
Muon-trained model exports exactly (Hugging Face, llama2.c), linear and warmup-stable-decay schedules pass doctor.

The models are tiny (dim 64, 2 layers, context 64) with llama2.c's real 512-token SentencePiece tokenizer: on a CPU
without native float16, fp16 autocast runs several times slower than float32, and the output layer dominates with a
larger vocabulary. Runs use one thread (in-process and in the subprocesses): on a busy 2-core machine two threads
of a model this small spend most of their time waiting for each other. Resumed and reference runs use the same
thread count, so their bit-exact comparison does not depend on it.
"""

from __future__ import annotations

import json
import math
import os
import signal
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, TOK512, one_line_error, run_cli
from procwatch import Lines
from tinystories.core.config import RunConfig, load_config
from tinystories.core.errors import UserError
from tinystories.model.checkpoint import load_model, read_checkpoint
from tinystories.training.loop import train
from tinystories.training.meters import MAX_SKIPPED_IN_A_ROW
from tinystories.training.schedule import lr_at

TINY = ["model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.max_seq_len=64",
        "model.dropout=0", "train.batch_size=8", "train.warmup_steps=10", "train.lr=3e-3", "train.max_minutes=null",
        "train.log_interval=1", "train.eval_tokens=2048", "train.sample_tokens=8", "train.compile=false",
        "train.eval_interval=1000", "train.checkpoint_interval=1000", f"tokenizer.path={TOK512}",
        "train.optimizer=adamw"]  # the float16 checks were sized with AdamW (cpu.yaml trains with Muon); MUON below
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def data(tmp_path_factory, stories300) -> dict:
    """The raw text (300 real stories) and one data directory (tokenizer + token cache) shared by every run."""
    return {"source": stories300, "data_dir": tmp_path_factory.mktemp("precision-data")}


def cfg_for(run_dir: Path, data: dict, *extra: str) -> RunConfig:
    cfg = load_config(REPO / "configs" / "cpu.yaml", TINY + [f"data.source={data['source']}",
                                                             f"data.data_dir={data['data_dir']}", *extra])
    cfg.out_dir = str(run_dir)
    return cfg


def cli_args(run_dir: Path, data: dict, *extra: str) -> list[str]:
    args = ["train", "--config", str(REPO / "configs" / "cpu.yaml"), "--out", str(run_dir),
            "--data", str(data["source"])]
    for s in TINY + [f"data.data_dir={data['data_dir']}", *extra]:
        args += ["--set", s]
    return args


def train_points(run_dir: Path) -> dict[int, dict]:
    """metrics.jsonl's train points by step (the last one logged for a step wins: a resumed run logs again)."""
    pts = map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
    return {p["step"]: p for p in pts if p["kind"] == "train"}


def killed_and_resumed(tmp: Path, data: dict, settings: list[str], kill_after: int) -> tuple[Path, Path, int, str]:
    """An uninterrupted run (the reference, through the CLI) and the same run killed with SIGKILL once its latest
    checkpoint is at step >= kill_after, then continued with --resume. Returns (reference run, resumed run, the
    step it resumed from, the resume's stdout)."""
    ref, killed = tmp / "ref", tmp / "killed"
    r = run_cli(*cli_args(ref, data, *settings), env=ONE_THREAD)
    assert r.returncode == 0, r.stderr[-2000:]
    proc = subprocess.Popen([sys.executable, "-m", "tinystories", *cli_args(killed, data, *settings)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", **ONE_THREAD})
    try:
        Lines(proc).saved_step_at_least(kill_after)  # the event, not a clock: it printed that the checkpoint is saved
        assert proc.poll() is None, "the run finished before it could be killed"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    resumed_from = read_checkpoint(killed, prefer="latest").step
    r = run_cli("train", "--resume", killed, env=ONE_THREAD)
    assert r.returncode == 0, r.stderr[-2000:]
    return ref, killed, resumed_from, r.stdout


def assert_same_losses_after(ref: Path, resumed: Path, resumed_from: int, min_steps: int = 10) -> None:
    a, b = train_points(ref), train_points(resumed)
    after = [s for s in a if s > resumed_from]
    assert len(after) >= min_steps and max(b) == max(a)
    assert [a[s]["loss"] for s in after] == [b[s]["loss"] for s in after]  # bit for bit on CPU


# ------------------------------------------------------------------------------------------- float16


@pytest.mark.slow
def test_float16_losses_track_float32(tmp_path, data):
    """60 steps in fp16 autocast + loss scaling against the same run in fp32 (same data, seed, init).

    Tolerance: the two runs' per-step train losses (~6.2 -> ~4.9 nats) may differ by at most 0.05 nats at any
    step and 0.01 nats on average. fp16 keeps a 10-bit mantissa (relative rounding 2^-11 ~ 4.9e-4, i.e. ~3e-3
    nats on a loss of 6 for one rounding of the logits), and the two trajectories drift apart as Adam compounds
    the rounding of each step's gradients. Measured over 4 seeds (1, 2, 3, 1337) of exactly this run on a busy
    2-core AMD EPYC: max |diff| 1.7e-2 / 5.0e-3 / 8.6e-3 / 3.1e-3, mean |diff| <= 1.6e-3 (the 4096-token
    vocabulary at dim 64: max 1.4e-4). A broken scaler (no unscaling before clipping, scaled gradients reaching
    Adam, steps skipped for nothing) moves the loss by tenths of a nat within these 60 steps.
    """
    for dtype in ("float32", "float16"):
        train(cfg_for(tmp_path / dtype, data, "train.max_steps=60", f"train.dtype={dtype}"))
    fp32, fp16 = train_points(tmp_path / "float32"), train_points(tmp_path / "float16")
    assert sorted(fp32) == sorted(fp16) == list(range(1, 61))
    diffs = [abs(fp32[s]["loss"] - fp16[s]["loss"]) for s in fp32]
    assert max(diffs) < 0.05 and sum(diffs) / len(diffs) < 0.01, (max(diffs), sum(diffs) / len(diffs))
    assert max(diffs) > 0  # it really computed in half precision (not a float32 run under another name)
    assert fp32[60]["loss"] < fp32[1]["loss"] - 1.0 and fp16[60]["loss"] < fp16[1]["loss"] - 1.0  # both learn
    # the scaler's figures are in every fp16 train point, and only there
    assert all(p["loss_scale"] == 65536.0 and p["skipped_steps"] == 0 for p in fp16.values())
    assert not any("loss_scale" in p or "skipped_steps" in p for p in fp32.values())


@pytest.mark.slow
def test_grad_scaler_backs_off_skips_and_recovers(tmp_path, data, capsys):
    """A loss scale of 1e9 overflows float16's gradients (max 65504): the scaler skips those steps and halves the
    scale each time until the gradients fit, then the run trains normally to finite weights and a falling loss."""
    init = 1e9
    train(cfg_for(tmp_path / "run", data, "train.max_steps=40", "train.dtype=float16", f"train.loss_scale_init={init}"))
    out = capsys.readouterr().out
    pts = train_points(tmp_path / "run")
    skipped = pts[40]["skipped_steps"]
    assert 3 <= skipped < MAX_SKIPPED_IN_A_ROW
    counts = [0] + [pts[s]["skipped_steps"] for s in range(1, 41)]
    # at most one more skip per step, and the scale halved at every skip, never grown again within 40 steps
    assert all(b - a in (0, 1) for a, b in zip(counts, counts[1:]))
    assert all(pts[s]["loss_scale"] == init * 0.5 ** counts[s] for s in range(1, 41))
    # the back-off: the first steps are skipped one after another until the gradients fit; later, as the model
    # starts to learn, its gradients can grow and overflow a few more times, each time halving the scale again
    backoff = next(s for s in range(1, 41) if counts[s] == counts[s - 1]) - 1
    assert backoff >= 3 and skipped - backoff <= 5 and counts[backoff] == backoff
    # a skipped step leaves the weights as they were: the loss stays the untrained model's (only the batch differs)
    untrained = [pts[s]["loss"] for s in range(1, backoff + 1)]
    assert max(untrained) - min(untrained) < 0.1 and abs(untrained[0] - math.log(512)) < 0.2
    late = [pts[s]["loss"] for s in range(36, 41)]
    assert max(late) < untrained[0] - 0.8 and all(math.isfinite(v) for v in late)
    model, _ = load_model(tmp_path / "run", prefer="latest")
    assert all(torch.isfinite(p).all() for p in model.parameters())
    # the progress line shows the scale and the skipped steps
    assert f"| scale {init * 0.5**skipped:.0e} ({skipped} skipped)" in out


@pytest.mark.slow
def test_overflow_at_every_scale_is_divergence_and_a_nan_loss_is_named(tmp_path, data, monkeypatch):
    # MAX_SKIPPED_IN_A_ROW halvings from 1e30 still overflow: the scaler is not backing off an overflow but
    # losing a divergence, and the run stops with the one-line error
    cfg = cfg_for(tmp_path / "huge", data, "train.max_steps=100", "train.dtype=float16", "train.loss_scale_init=1e30")
    with pytest.raises(UserError, match=f"overflowed float16 at every loss scale at step {MAX_SKIPPED_IN_A_ROW - 1}"):
        train(cfg)
    # a NaN loss in float16 also overflows that step's gradients (one skip): it is reported as a NaN loss
    from conftest import poison_loss_after

    poison_loss_after(monkeypatch, 5)
    with pytest.raises(UserError, match="the loss became NaN/inf at step 5"):
        train(cfg_for(tmp_path / "nan", data, "train.max_steps=20", "train.dtype=float16"))


@pytest.mark.slow
def test_float16_exact_resume_after_kill_9(tmp_path, data):
    """kill -9 and --resume in fp16 give the uninterrupted run's losses, bit for bit. The scale starts at 1e9, so
    the first steps overflow and back off before the kill: a resume that lost the scaler's state would start again
    at 1e9 and skip steps the reference did not. Dropout on: the RNG state is restored too."""
    settings = ["train.max_steps=60", "train.checkpoint_interval=10", "train.dtype=float16",
                "train.loss_scale_init=1e9", "model.dropout=0.1"]
    ref, resumed, resumed_from, _ = killed_and_resumed(tmp_path, data, settings, kill_after=20)
    assert 20 <= resumed_from < 60
    assert_same_losses_after(ref, resumed, resumed_from)
    a, b = train_points(ref), train_points(resumed)
    assert a[60]["skipped_steps"] == b[60]["skipped_steps"] > 0 and a[60]["loss_scale"] == b[60]["loss_scale"] < 1e9


@pytest.mark.slow
def test_train_float16_states_its_policy(tmp_path, data):
    """`train --set train.dtype=float16` on this CPU says it trains in float16 with loss scaling, and why."""
    r = run_cli(*cli_args(tmp_path / "run", data, "train.max_steps=3", "train.dtype=float16"), env=ONE_THREAD)
    assert r.returncode == 0, r.stderr[-2000:]
    line = next(s for s in r.stdout.splitlines() if s.startswith("device cpu"))
    assert "float16 autocast + loss scaling (train.dtype" in line, line
    assert "| scale 7e+04 (0 skipped)" in r.stdout  # torch's first scale, 65536, in the progress line


# ------------------------------------------------------------------------------------------- Muon


MUON = ["train.optimizer=muon", "train.muon_lr=0.02", "train.muon_momentum_warmup=50", "train.zero_init_residual=true"]


@pytest.mark.slow
def test_muon_exact_resume_after_kill_9(tmp_path, data):
    """Muon (blocks' matrices) + AdamW (the rest), zero-initialised residual projections, momentum warmup across
    the kill: the resumed run continues both optimizers' states exactly (and does not zero-init again)."""
    settings = MUON + ["train.max_steps=120", "train.checkpoint_interval=10", "train.dtype=float32",
                       "model.dropout=0.1"]
    ref, resumed, resumed_from, out = killed_and_resumed(tmp_path, data, settings, kill_after=30)
    assert 30 <= resumed_from < 120 and "resumed from" in out
    assert_same_losses_after(ref, resumed, resumed_from)
    a = train_points(ref)
    assert a[120]["loss"] < a[1]["loss"] - 1.0  # Muon trains
    # resumed with the other optimizer: a one-line error before anything is written (config.yaml untouched)
    config = (resumed / "config.yaml").read_bytes()
    r = run_cli("train", "--resume", resumed, "--set", "train.optimizer=adamw", env=ONE_THREAD)
    one_line_error(r, "train.optimizer=adamw: the checkpoint's optimizer state was saved with train.optimizer=muon",
                   "--set train.optimizer=muon")
    assert (resumed / "config.yaml").read_bytes() == config


@pytest.mark.slow
def test_muon_trained_model_exports_exactly(tmp_path, data, capsys, monkeypatch):
    """A Muon-trained run (zero-initialised residual projections, grouped-query attention) exports to Hugging Face
    (transformers' logits and greedy tokens equal ours) and to llama2.c (the file imports back to equal weights)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    from test_interop import _check_hf  # the check test_interop runs on AdamW-trained and imported models

    from tinystories.cli import main
    from tinystories.export.llama2c import import_llama2c

    run = tmp_path / "run"
    train(cfg_for(run, data, *MUON, "train.max_steps=40", "train.dtype=float32"))
    ck = read_checkpoint(run, prefer="latest").path
    ours, _ = load_model(ck)
    for name, p in ours.named_parameters():  # trained away from the zero init
        assert p.abs().sum() > 0, name
    _check_hf(ck, tmp_path / "hf", capsys)

    out = tmp_path / "llama2c" / "model.bin"
    out.parent.mkdir()
    assert main(["export", "--format", "llama2c", "--checkpoint", str(ck), "--out", str(out)]) == 0
    (vocab,) = struct.unpack("<i", out.read_bytes()[20:24])
    assert vocab == 512  # version 0, shared classifier
    back = tmp_path / "back"
    import_llama2c(out, TOK512, back)
    again, _ = load_model(back)
    sa, sb = ours.state_dict(), again.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    x = torch.randint(0, 512, (2, 64))
    with torch.no_grad():
        assert torch.equal(ours(x)[0], again(x)[0])


# ------------------------------------------------------------------------------------------- lr schedules


def _schedule(name: str, *extra: str) -> list[float]:
    cfg = load_config(None, ["train.lr=1e-3", "train.min_lr=1e-4", "train.warmup_steps=10",
                             f"train.lr_schedule={name}", *extra])
    return [lr_at(s, cfg, 110) for s in range(111)]


def test_linear_schedule_shape():
    lrs = _schedule("linear")
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)  # warmup as in cosine
    assert lrs[10] == pytest.approx(1e-3) and lrs[35] == pytest.approx(7.75e-4) and lrs[60] == pytest.approx(5.5e-4)
    steps = [a - b for a, b in zip(lrs[10:110], lrs[11:111])]
    assert all(d == pytest.approx(9e-6) for d in steps)  # a straight line from lr at step 10 to min_lr at 110
    assert lrs[110] == pytest.approx(1e-4)


@pytest.mark.parametrize("frac", [0.2, 0.5, 1.0])
def test_wsd_schedule_shape(frac):
    lrs = _schedule("wsd", f"train.cooldown_frac={frac}")
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    cool = 110 - round(frac * 100)  # the cooldown is the last `frac` of the 100 steps after warmup
    assert all(lr == pytest.approx(1e-3) for lr in lrs[9 : cool + 1])  # stable
    decay = lrs[cool:111]
    assert all(a - b == pytest.approx(9e-4 / (110 - cool)) for a, b in zip(decay, decay[1:]))  # linear cooldown
    assert lrs[110] == pytest.approx(1e-4)
    if frac == 1.0:  # all of the run after warmup cools down: the linear schedule
        assert lrs == pytest.approx(_schedule("linear"))


def test_cooldown_frac_outside_zero_to_one_is_a_config_error():
    for bad in ("0", "-0.1", "1.5"):
        with pytest.raises(UserError, match=f"train.cooldown_frac={float(bad)} must be > 0 and <= 1"):
            load_config(None, [f"train.cooldown_frac={bad}"])


@pytest.mark.slow
def test_short_wsd_run_passes_doctors_lr_check(tmp_path, data):
    from tinystories.evaluation.doctor import run_checks

    def lr_check():
        return next(c for c in run_checks(tmp_path / "run", samples=0)[0] if c.name == "lr schedule")

    train(cfg_for(tmp_path / "run", data, "train.max_steps=30", "train.warmup_steps=5", "train.lr_schedule=wsd",
                  "train.cooldown_frac=0.4", "train.min_lr=3e-4", "train.dtype=float32"))
    lrs = [p["lr"] for p in train_points(tmp_path / "run").values()]
    assert lrs[4] == lrs[20] == pytest.approx(3e-3)  # warmed up by step 5 (the point of step 4), stable to 20
    assert all(a > b for a, b in zip(lrs[20:], lrs[21:])) and lrs[-1] < 1e-3  # then the cooldown to min_lr
    check = lr_check()
    assert check.status == "PASS", check
    assert "constant, then linear over the last 40% to 0.0003 at step 30" in check.detail, check
    # doctor follows the schedule the run logged: the same rates read as a cosine run's do not pass
    metrics = tmp_path / "run" / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    (segment,) = [r for r in rows if r["kind"] == "segment"]
    assert segment["schedule"]["lr_schedule"] == "wsd"
    segment["schedule"]["lr_schedule"] = "cosine"
    metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert lr_check().status == "FAIL"
