"""The trainer's parts on their own, without a training run: TrainState (state.json) round trips, RunLength (the
run length, the time budget, the learning rate), early stopping, the device choices, atomic writes and
check_compatible. Unit tests, a few seconds in all; only the compatibility test reads ../shared (real tokenizers)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tinystories.core.atomic import atomic_dir, atomic_file, replace_symlink, write_text_atomic
from tinystories.core.config import load_config
from tinystories.core.errors import UserError
from tinystories.model.device import DeviceCaps, pick_device, pick_dtype
from tinystories.training.length import BUDGET_MEASURE_STEPS, RunLength
from tinystories.training.schedule import PROVISIONAL_TOTAL, effective_warmup, lr_at
from tinystories.training.state import TrainState


def cfg_with(*sets: str):
    return load_config(None, ["train.lr=1e-3", "train.min_lr=1e-4", *sets])


# ------------------------------------------------------------------------------------------------ TrainState


def test_train_state_round_trips_through_state_json():
    st = TrainState(step=120, total_steps=400, metrics={"val_loss": 2.5, "train_loss": 2.6}, best_val_loss=2.4,
                    evals_without_improvement=2, deadline_left_s=31.5, init_from="/runs/a/checkpoints/step-00000010")
    facts = {"tokens": 120 * 4096, "epoch": 0.25, "cache_dir": "/data/cache/x", "global_batch": 16, "world_size": 1,
             "n_params": 1000}
    d = json.loads(json.dumps(st.to_dict(facts)))  # through JSON, as a checkpoint stores it
    assert TrainState.from_dict(d) == st
    # the file keeps its keys (readers: eval, doctor, plot, a resume), in the order it always had
    assert list(d) == ["step", "tokens", "epoch", "total_steps", "cache_dir", "metrics", "best_val_loss",
                       "evals_without_improvement", "global_batch", "world_size", "n_params", "deadline_left_s",
                       "init_from"]
    assert d["tokens"] == 120 * 4096 and d["n_params"] == 1000
    assert "init_from" not in TrainState(step=1).to_dict()  # only a fine-tuning run records it


def test_train_state_reads_an_older_state_json():
    # a checkpoint from before the run length, the deadline and early stopping were recorded, and an import's
    old = TrainState.from_dict({"step": 7, "tokens": 7000, "metrics": {"val_loss": 3.0}})
    assert old == TrainState(step=7, metrics={"val_loss": 3.0})
    assert old.best_val_loss == math.inf and old.total_steps is None and old.init_from is None
    assert TrainState.from_dict({"step": 0, "tokens": 0, "source": {"format": "llama2c"}}) == TrainState()


def test_early_stopping_counts_evaluations_without_improvement():
    st = TrainState()
    assert st.record_eval(3.0) and st.best_val_loss == 3.0
    assert not st.record_eval(3.1) and not st.record_eval(3.0)  # equal is not better
    assert st.evals_without_improvement == 2 and st.early_stop(3) is None
    assert not st.record_eval(3.2)
    assert st.early_stop(3) == "early stop: no val improvement in 3 evaluations"
    assert st.early_stop(None) is None and st.early_stop(0) is None  # no patience set: never
    assert st.record_eval(2.9) and st.evals_without_improvement == 0 and st.early_stop(1) is None
    # the final evaluation updates the best but does not count a miss
    assert not st.record_eval(5.0, count_miss=False) and st.evals_without_improvement == 0


# ------------------------------------------------------------------------------------------------- RunLength


def test_run_length_from_steps_tokens_and_epochs():
    assert RunLength.plan(cfg_with("train.max_steps=50"), 1024, 10**6).total == 50
    assert RunLength.plan(cfg_with("train.max_tokens=10000"), 1024, 10**6).total == 10  # ceil(10000 / 1024)
    length = RunLength.plan(cfg_with("train.epochs=2"), 1000, 4500)
    assert length.total == 9 and not length.provisional and length.deadline is None and length.logged_total == 9
    with pytest.raises(UserError, match="set the run length"):
        RunLength.plan(load_config(None, []), 1024, 10**6)


def test_warmup_shorter_than_the_run():
    # 20 steps with a 100-step warmup: the first 10% warm up, then the whole cosine down to min_lr
    length = RunLength.plan(cfg_with("train.max_steps=20", "train.warmup_steps=100"), 1024, 10**6)
    assert effective_warmup(100, 20) == 2
    lrs = [length.lr(s) for s in range(21)]
    assert lrs[0] == pytest.approx(5e-4) and lrs[1] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:])) and lrs[20] == pytest.approx(1e-4)
    assert lrs == [lr_at(s, length.cfg, 20) for s in range(21)]  # the one schedule doctor checks against


def test_time_budget_is_fixed_after_ten_steps():
    cfg = cfg_with("train.max_minutes=1", "train.warmup_steps=1000")
    length = RunLength.plan(cfg, 1024, 10**6, now=1000.0)
    assert length.provisional and length.total == PROVISIONAL_TOTAL and length.logged_total is None
    assert length.deadline == 1060.0
    now = 1000.0
    for step in range(1, BUDGET_MEASURE_STEPS + 1):  # 0.5 s per step
        now += 0.5
        length.record_step_time(step, 0.5)
        fixed = length.fix_budget(step, now)
        assert (fixed is None) == (step < BUDGET_MEASURE_STEPS), step
    # the first 2 steps are not measured (compilation); 55 s left at 0.5 s x 1.08 per step: 101 more steps
    assert length.measured_steps == BUDGET_MEASURE_STEPS - 2
    assert not length.provisional and length.total == 10 + int(55 / 0.54) == length.logged_total
    assert fixed == f"time budget: 1 min -> {length.total} steps (500 ms/step, evaluation included)"
    # a budget shorter than the configured warmup: 10% warmup, a full decay to min_lr at the end
    assert length.lr(length.total) == pytest.approx(1e-4) and length.lr(length.total // 10) == pytest.approx(1e-3)
    assert length.fix_budget(11, now + 0.5) is None  # fixed once
    length.stop_if_over_budget(50, 1064.0)
    assert length.total == length.logged_total != 50  # within the 5 s grace
    length.stop_if_over_budget(50, 1066.0)
    assert length.total == 50  # past it: finish now


def test_time_budget_follows_the_pace_the_run_keeps():
    length = RunLength.plan(cfg_with("train.max_minutes=1"), 1024, 10**6, now=1000.0)
    now = 1000.0
    for step in range(1, BUDGET_MEASURE_STEPS + 1):  # the first steps: 0.5 s each
        now += 0.5
        length.record_step_time(step, 0.5)
        length.fix_budget(step, now)
    first = length.total
    assert first == 10 + int(55 / 0.54)
    # then the run keeps 0.4 s per step (evaluations included): at step 40, 42 s are left after a 1 s final
    # evaluation, 105 more steps
    assert length.replan(40, now + 30 * 0.4, reserve_s=1.0) == (
        f"time budget: on pace for 145 steps, not {first} (400 ms/step since step 10)")
    assert length.total == length.logged_total == 145
    assert length.replan(40, now + 30 * 0.4, reserve_s=1.0) is None  # the same pace: unchanged
    # slower than planned: shorter, never less than one more step
    assert length.replan(60, now + 50 * 0.9, reserve_s=1.0) is not None and length.total == 60 + int(9 / 0.9)
    assert length.replan(69, 1059.9, reserve_s=1.0) is None  # the last 15% of the run: the decay ends as planned
    assert length.total == 70
    # a length in steps, and a budget that has not been measured yet, are never re-planned
    steps = RunLength.plan(cfg_with("train.max_steps=50"), 1024, 10**6)
    assert steps.replan(20, 1e9, reserve_s=0.0) is None and steps.total == 50
    early = RunLength.plan(cfg_with("train.max_minutes=1"), 1024, 10**6, now=0.0)
    assert early.replan(5, 10.0, reserve_s=0.0) is None and early.provisional


def test_time_budget_stops_at_max_passes_over_the_data():
    # 1 minute at 0.5 s per step buys 111 steps; 2 passes over 40,960 tokens at 1,024 a step are 80
    length = RunLength.plan(cfg_with("train.max_minutes=1", "train.max_passes=2"), 1024, 40_960, now=1000.0)
    assert length.provisional and length.cap == 80
    now = 1000.0
    for step in range(1, BUDGET_MEASURE_STEPS + 1):
        now += 0.5
        length.record_step_time(step, 0.5)
        fixed = length.fix_budget(step, now)
    assert length.total == 80 and fixed == ("time budget: 1 min -> 80 steps (500 ms/step, evaluation included; at "
                                            "most 2 passes over the data (train.max_passes): 80 of the 111 the "
                                            "budget buys)")
    assert length.lr(80) == pytest.approx(1e-4)  # the schedule decays within the passes
    # a faster pace buys more steps, never more than the passes
    assert length.replan(40, now + 1.0, reserve_s=0.0) is None and length.total == 80
    # a slower one still shortens the run
    assert length.replan(40, now + 30 * 1.5, reserve_s=0.0) is not None and length.total == 40 + int(10 / 1.5)
    # a cap the budget never reaches changes nothing
    wide = RunLength.plan(cfg_with("train.max_minutes=1", "train.max_passes=50"), 1024, 40_960, now=0.0)
    for step in range(1, BUDGET_MEASURE_STEPS + 1):
        wide.record_step_time(step, 0.5)
        fixed = wide.fix_budget(step, step * 0.5)
    assert wide.total == 10 + int(55 / 0.54) and "max_passes" not in fixed


def test_time_budget_past_its_deadline_before_ten_steps():
    length = RunLength.plan(cfg_with("train.max_minutes=0.05"), 1024, 10**6, now=0.0)  # 3 s
    length.record_step_time(1, 4.0)
    assert length.fix_budget(1, 4.0) is not None and length.total == 2  # at least one more step


def test_resumed_run_keeps_or_extends_its_length():
    saved = TrainState(step=20, total_steps=20)
    # --resume --set train.max_steps=30: the cosine is stretched from step 20 on
    length = RunLength.plan(cfg_with("train.max_steps=30"), 1024, 10**6, saved)
    assert length.total == 30 and length.start_step == 20 and length.lr(20) > length.lr(29) > 1e-4
    # a time-budget run resumed after its length was fixed keeps that length (and no new deadline)
    budget = cfg_with("train.max_minutes=10")
    length = RunLength.plan(budget, 1024, 10**6, TrainState(step=40, total_steps=120, deadline_left_s=100.0))
    assert length.total == 120 and not length.provisional and length.deadline is None
    # ... resumed while still measuring: the budget left, not a new one
    length = RunLength.plan(budget, 1024, 10**6, TrainState(step=5, deadline_left_s=100.0), now=0.0)
    assert length.provisional and length.deadline == 100.0 and length.start_step == 5
    assert length.fix_budget(14, 50.0) is None and length.fix_budget(15, 50.0) is not None


# ---------------------------------------------------------------------------------------------------- device


def test_dtype_choice_from_injected_capabilities():
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert pick_dtype("auto", cpu, DeviceCaps("cpu", cpu_bf16="amx_bf16")) == torch.bfloat16
    assert pick_dtype("auto", cpu, DeviceCaps("cpu")) == torch.float32
    assert pick_dtype("auto", cuda, DeviceCaps("cuda", 0, "NVIDIA H100", (9, 0), cuda_bf16=True)) == torch.bfloat16
    assert pick_dtype("auto", cuda, DeviceCaps("cuda", 0, "Tesla T4", (7, 5))) == torch.float16
    assert pick_dtype("auto", torch.device("mps"), DeviceCaps("mps")) == torch.float32
    assert pick_dtype("float16", cpu, DeviceCaps("cpu", cpu_bf16="amx_bf16")) == torch.float16


def test_device_errors_are_one_line_user_errors():
    assert pick_device("cpu") == torch.device("cpu")
    with pytest.raises(UserError, match="not a torch device"):
        pick_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="no CUDA GPU"):
            pick_device("cuda")


# ---------------------------------------------------------------------------------------------------- atomic


def test_atomic_file_keeps_the_old_file_on_an_error(tmp_path):
    f = tmp_path / "report.json"
    write_text_atomic(f, "old")
    with pytest.raises(RuntimeError):
        with atomic_file(f, "w") as out:
            out.write("half")
            raise RuntimeError("disk full")
    assert f.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]
    write_text_atomic(f, "new")
    assert f.read_text() == "new" and len(list(tmp_path.iterdir())) == 1


def test_atomic_dir_swaps_in_complete_directories_only(tmp_path):
    out = tmp_path / "export"
    with atomic_dir(out) as tmp:
        (tmp / "a").write_text("1")
    assert (out / "a").read_text() == "1"
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(out) as tmp:
            (tmp / "a").write_text("2")
            raise KeyboardInterrupt
    assert (out / "a").read_text() == "1" and sorted(p.name for p in tmp_path.iterdir()) == ["export"]
    with atomic_dir(out) as tmp:
        (tmp / "b").write_text("3")
    assert sorted(p.name for p in out.iterdir()) == ["b"] and len(list(tmp_path.iterdir())) == 1
    replace_symlink(tmp_path / "latest", "export")
    replace_symlink(tmp_path / "latest", "export")
    assert (tmp_path / "latest" / "b").read_text() == "3"


# ------------------------------------------------------------------------------------------ check_compatible


def test_one_compatibility_rule_for_resume_and_init_from(random_checkpoint):
    """check_compatible: the same architecture and tokenizer, with a message for a resumed and a fine-tuning run
    (uses the real 4K tokenizer of the `random_checkpoint` fixture, and llama2.c's tok512.model)."""
    from conftest import TOK512
    from tinystories.data.tokenizer import load_tokenizer
    from tinystories.model.checkpoint import check_compatible, read_checkpoint

    ck = read_checkpoint(random_checkpoint)
    same = ck.cfg.model_copy(deep=True)
    for resume in (True, False):
        check_compatible(ck, same, ck.tokenizer, resume=resume, where="runs/a")  # no error
    follow = ck.cfg.model_copy(deep=True)
    follow.model.vocab_size = 0  # "follow the tokenizer" matches any vocabulary
    check_compatible(ck, follow, None, resume=False, where="runs/a")

    wider = ck.cfg.model_copy(deep=True)
    wider.model.dim = 128
    with pytest.raises(UserError, match=r"^--resume: model.dim cannot change on resume \(the run has 64\); "
                                        r"--set model.dim=128 asks for 128"):
        check_compatible(ck, wider, ck.tokenizer, resume=True, where="runs/a", overrides=["model.dim=128"])
    with pytest.raises(UserError, match=r"^--resume: model.dim .*\(the run has 64\); the config now has 128"):
        check_compatible(ck, wider, ck.tokenizer, resume=True, where="runs/a")
    with pytest.raises(UserError, match=r"^--set model.dim=128: model.dim cannot differ from the --init-from "
                                        r"checkpoint \(64\)"):
        check_compatible(ck, wider, None, resume=False, where="ck", overrides=["model.dim=128"])
    kv = ck.cfg.model_copy(deep=True)
    kv.model.n_kv_heads = None  # = n_heads (4): another architecture than the checkpoint's 2 kv heads
    with pytest.raises(UserError, match=r"^--init-from ck: the run's model.n_kv_heads \(4\) cannot differ .*\(2\)"):
        check_compatible(ck, kv, None, resume=False, where="ck")

    other = load_tokenizer(TOK512)
    with pytest.raises(UserError, match=r"^--resume: the tokenizer cannot change on resume: .* 4096-token "
                                        r"tokenizer.json, the config now gives .*tok512.model; .*--init-from runs/a"):
        check_compatible(ck, same, other, resume=True, where="runs/a")
    with pytest.raises(UserError, match=r"^--init-from ck: the tokenizer cannot differ from the --init-from"):
        check_compatible(ck, same, other, resume=False, where="ck")
    with pytest.raises(UserError, match=r"^--set tokenizer.vocab_size=512: the tokenizer cannot differ"):
        check_compatible(ck, same, None, resume=False, where="ck", overrides=["tokenizer.vocab_size=512"])
    # a resumed run whose tokenizer is still to be trained: its settings must be the run's
    settings = ck.cfg.model_copy(deep=True)
    settings.tokenizer.vocab_size = 2048
    with pytest.raises(UserError, match=r"a new 2048-token tokenizer \(--set tokenizer.vocab_size=2048\)"):
        check_compatible(ck, settings, None, resume=True, where="runs/a", overrides=["tokenizer.vocab_size=2048"])


def test_scaler_skips_counts_on_the_device_and_survives_a_resume():
    """float16's skipped updates are counted from the gradient norm without a host sync per step; a long run of
    skips is reported (at the step where it reached the limit) and the run-in-a-row survives a save/load."""
    from tinystories.training.meters import MAX_SKIPPED_IN_A_ROW, ScalerGaveUp, ScalerSkips

    skips = ScalerSkips(torch.device("cpu"))
    for step, norm in enumerate([1.0, float("inf"), float("nan"), 2.0, float("inf")]):
        skips.add(torch.tensor(norm), step)
    assert skips.check() == 3 and int(skips.in_a_row) == 1
    saved = skips.state_dict()
    assert saved == {"skipped_steps": 3, "skipped_in_a_row": 1}
    resumed = ScalerSkips(torch.device("cpu"))
    resumed.load_state_dict({**saved, "scale": 1.0})
    for step in range(5, 5 + MAX_SKIPPED_IN_A_ROW):
        resumed.add(torch.tensor(float("inf")), step)
    with pytest.raises(ScalerGaveUp) as e:
        resumed.check()
    assert e.value.args[0] == 5 + MAX_SKIPPED_IN_A_ROW - 2  # the 30th skip in a row: one was before the save


def test_each_rank_restores_its_own_rng_state_and_older_checkpoints_load():
    """trainer.pt holds the RNG states by rank; rank r restores entry r. An older trainer.pt (one state: rank 0's)
    still loads: rank 0 restores it, another rank keeps its own seeded state instead of taking rank 0's."""
    from types import SimpleNamespace

    from tinystories.model.device import Dist
    from tinystories.training.run import Run

    def fake_run(rank: int, world: int):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
        return SimpleNamespace(optimizer=opt, scaler=torch.amp.GradScaler("cpu", enabled=False),
                               d=Dist(rank=rank, local_rank=rank, world=world), device=torch.device("cpu"))

    states = []
    for seed in (10, 11):
        torch.manual_seed(seed)
        states.append(torch.get_rng_state())
    ts = {"optimizer": fake_run(0, 2).optimizer.state_dict()}
    for rank in (0, 1):
        torch.manual_seed(99)
        Run.load_trainer_state(fake_run(rank, 2), {**ts, "cpu_rng": states})
        assert torch.equal(torch.get_rng_state(), states[rank])
    # an older checkpoint: one state
    Run.load_trainer_state(fake_run(0, 2), {**ts, "cpu_rng": states[0]})
    assert torch.equal(torch.get_rng_state(), states[0])
    torch.manual_seed(99)
    own = torch.get_rng_state()
    Run.load_trainer_state(fake_run(1, 2), {**ts, "cpu_rng": states[0]})
    assert torch.equal(torch.get_rng_state(), own)


def test_compiled_dropout_uses_the_same_masks_as_eager():
    """The training model compiled on a CPU draws dropout's masks from ATen's generator (fallback_random): with the
    same seed its loss and gradients equal the uncompiled model's, so forward and backward share one mask and a
    compiled run follows the same random stream as an eager one. Inductor's own generator gave other masks
    (gradients 0.02 apart)."""
    from tinystories.core.config import ModelConfig
    from tinystories.model.device import Dist
    from tinystories.model.transformer import Transformer
    from tinystories.training.run import wrap_model

    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=512, dim=64, n_layers=2, n_heads=4, max_seq_len=64, dropout=0.1))
    x = torch.randint(0, 512, (4, 65))

    def loss_and_grads(m):
        torch.manual_seed(123)
        model.zero_grad(set_to_none=True)
        _, loss = m(x[:, :-1], x[:, 1:])
        loss.backward()
        return loss.item(), [p.grad.clone() for p in model.parameters()]

    eager_loss, eager_grads = loss_and_grads(model)
    compiled = wrap_model(model, Dist(), torch.device("cpu"), compile=True)
    loss_and_grads(compiled)  # compiles
    loss, grads = loss_and_grads(compiled)
    assert loss == pytest.approx(eager_loss, abs=1e-6)
    assert max((a - b).abs().max().item() for a, b in zip(eager_grads, grads)) < 1e-6
