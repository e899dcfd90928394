"""The training loop: `tinystories train`. Start reading here.

One optimizer step (train_step), on every process:
    1. apply_schedule (optim.py): the step's learning rate (RunLength.lr: linear warmup, then a cosine, linear or
       warmup-stable-decay decay to min_lr at the run's length) on every parameter group, and Muon's momentum.
    2. grad_accum micro-steps (forward_backward): the windows the sampler draws for (step, micro-step, rank)
       (batches.py), the forward pass under the device policy's autocast, the loss divided by grad_accum (and
       scaled by float16's GradScaler; a pass-through elsewhere), backward. Under DDP the gradients are all-reduced
       on the last micro-step only. Each loss is summed on the device by the LossMeter (meters.py).
    3. optimizer_step: the gradients unscaled (float16) and clipped to train.grad_clip, then AdamW, or Muon for the
       blocks' matrices (optim.py); a float16 step whose gradients overflowed is skipped and counted.
The loss is read back only at log intervals (a NaN there stops the run with its step).

Around the steps, Trainer.fit evaluates every train.eval_interval steps (validation loss, a sample story, a
checkpoint, early stopping), logs every train.log_interval steps (report.py), checkpoints, fixes a time budget's
length once the step time is measured (length.py), and ends with a final evaluation. A resumed run continues
exactly where it stopped: the checkpoint brings back the weights, the optimizer, the loss scaler, every rank's RNG
(run.py) and the TrainState (state.py), and the windows depend on the step alone.

The parts, in the order a run uses them:
    setup()          -> Run         device policy, data, model, batch geometry, optimizer, compile/DDP (run.py)
    Trainer                         the RunLength, Reporter and LossMeter of a Run, from a TrainState
    train_step()                    micro-batches, accumulation, clipping, the optimizer step
    Trainer.evaluate_and_save()     every evaluation (the last one too): log, sample, checkpoint, early stop
    Trainer.fit()                   the loop
    train()                         all of it, under torchrun too (the `train` command: command.py)
"""

from __future__ import annotations

import contextlib
import gc
import math
import time
from pathlib import Path

import torch
import torch.distributed as dist

from tinystories.core.atomic import ensure_writable_dir
from tinystories.core.config import RunConfig, save_config
from tinystories.core.errors import UserError
from tinystories.core.fmt import fmt_clock, fmt_count
from tinystories.core.runs import checkpoints_dir
from tinystories.data.requests import RequestTokens
from tinystories.data.tokenizer import TextTokenizer
from tinystories.model.checkpoint import (
    check_compatible,
    load_trainer_state,
    load_weights,
    read_checkpoint,
    save_checkpoint,
)
from tinystories.model.device import (
    Dist,
    autocast_ctx,
    choose_policy,
    detect_caps,
    init_distributed,
    peak_flops,
    pick_device,
)
from tinystories.model.transformer import Transformer
from tinystories.training.batches import (
    WindowSampler,
    find_micro_batch,
    load_run_data,
    set_batch_geometry,
    validation_subset,
)
from tinystories.training.length import RunLength, configured_steps, require_run_length
from tinystories.training.meters import LossMeter, NonFiniteLoss, ScalerGaveUp, ScalerSkips
from tinystories.training.optim import (
    apply_schedule,
    check_optimizer_state,
    make_optimizer,
    zero_init_residual_projections,
)
from tinystories.training.report import Reporter, progress_line
from tinystories.training.run import Run, wrap_model
from tinystories.training.state import TrainState

# `tinystories.train` aliases this module: these names, imported by scripts from it, stay importable here
fmt_secs = fmt_clock
__all__ = ["Trainer", "setup", "train_step", "configured_steps", "find_micro_batch", "fmt_count", "fmt_secs",
           "require_run_length", "train", "WindowSampler"]


def _quiet(*args, **kwargs) -> None:
    """The log of a rank other than 0 (only rank 0 prints)."""


# ------------------------------------------------------------------------------------------------- setup


def _resume_point(cfg: RunConfig, tok: TextTokenizer, resume: bool) -> tuple[TrainState, dict | None, Path | None]:
    """Where the run continues from: a resumed run's TrainState, trainer.pt and checkpoint (latest), checked
    before anything is written; a fresh TrainState, no trainer state and no checkpoint for a new run."""
    if not resume:
        return TrainState(), None, None
    run_dir = Path(cfg.out_dir)
    ck = read_checkpoint(run_dir, prefer="latest")
    check_compatible(ck, cfg, tok, resume=True, where=run_dir)
    trainer_state, state = load_trainer_state(ck.path), TrainState.from_dict(ck.state)
    check_optimizer_state(cfg.train.optimizer, trainer_state["optimizer"])
    return state, trainer_state, ck.path


def _build_model(cfg: RunConfig, d: Dist, device: torch.device, tok: TextTokenizer, resumed_from: Path | None,
                 init_from: str | None, state: TrainState, log) -> Transformer:
    """The model on `device`: seeded with train.seed + rank, then a resumed run's weights or --init-from's."""
    torch.manual_seed(cfg.train.seed + d.rank)
    model = Transformer(cfg.model)
    if resumed_from is not None:
        load_weights(model, resumed_from)
    elif init_from:
        src = read_checkpoint(init_from)
        check_compatible(src, cfg, tok, resume=False, where=init_from)
        load_weights(model, src.path)
        state.init_from = str(src.path)
        log(f"initialised from {src.path} (step {src.step}; architecture and tokenizer from the checkpoint)")
    model.to(device)
    m = cfg.model
    log(f"model: {model.num_params() / 1e6:.2f}M parameters ({model.num_params(non_embedding=True) / 1e6:.2f}M "
        f"without embeddings), {m.n_layers} layers, dim {m.dim}, {m.n_heads} heads ({m.kv_heads} kv), "
        f"context {m.max_seq_len}, vocab {m.vocab_size}")
    return model


def setup(cfg: RunConfig, d: Dist, resume: bool = False, init_from: str | None = None,
          micro_batch: str | None = None) -> tuple[Run, TrainState]:
    """Build a run: device, data, model (fresh, resumed or --init-from), batch geometry, optimizer, compile/DDP.
    Returns it with the state to continue from (a fresh TrainState for a new run)."""
    log = print if d.main else _quiet
    device = pick_device(cfg.train.device, d)
    policy = choose_policy(detect_caps(device), cfg.train)
    policy.apply()
    tok, cache = load_run_data(cfg, d, log)
    state, trainer_state, resumed_from = _resume_point(cfg, tok, resume)
    model = _build_model(cfg, d, device, tok, resumed_from, init_from, state, log)
    batch = set_batch_geometry(cfg, d, device, policy.dtype, micro_batch, log)
    t = cfg.train
    if t.zero_init_residual and not (resume or init_from):
        zero_init_residual_projections(model)
    log(f"batch: {batch.describe()}; device {device}, {str(policy.dtype).removeprefix('torch.')}"
        f"{', compiled' if policy.compile else ''}")
    log(policy.describe())
    optimizer = make_optimizer(model, t, device)
    wrapped = wrap_model(model, d, device, policy.compile)
    if resumed_from is not None:
        log(f"resumed from {resumed_from} at step {state.step}")
    if d.main:
        save_config(cfg, ensure_writable_dir(cfg.out_dir, "run") / "config.yaml")
    unscored = None
    if t.loss_on == "story" and cfg.data.format == "instruct":
        unscored = RequestTokens(tok)
        log("loss: on the stories only (train.loss_on=story): request lines are context, not targets")
    if unscored is not None and t.request_word_weight != 1.0:
        log(f"loss: x{t.request_word_weight:g} where a story first writes a requested word (train.request_word_weight)")
    sampler = WindowSampler(cache, cfg.model.max_seq_len, t.batch_size, t.seed, d.rank, device, d.world, unscored,
                            t.request_word_weight, t.windows, t.grad_accum)
    val_stream, val_bytes = validation_subset(cache, tok, t.eval_tokens)
    run = Run(cfg=cfg, d=d, log=log, device=device, policy=policy, amp=autocast_ctx(device, policy.dtype),
              scaler=policy.make_grad_scaler(t.loss_scale_init), skips=ScalerSkips(device),
              peak=peak_flops(device, policy.dtype), tok=tok, cache=cache, batch=batch, sampler=sampler,
              val_stream=val_stream, val_bytes=val_bytes, raw_model=model, model=wrapped, optimizer=optimizer,
              n_params=model.num_params(), flops_per_token=model.flops_per_token())
    if trainer_state is not None:
        run.load_trainer_state(trainer_state)  # the optimizer's state and the RNGs, last
    return run, state


# -------------------------------------------------------------------------------------------------- step


def forward_backward(run: Run, x: torch.Tensor, y: torch.Tensor, sync: bool,
                     weights: torch.Tensor | None = None) -> torch.Tensor:
    """One micro-batch: the loss, and its share of the gradient (DDP synchronises gradients only when `sync`).
    `weights` (one per target): the gradient comes from the weighted mean over the scored targets; the loss
    returned (logged, checked for NaN) stays the plain mean."""
    ctx = run.model.no_sync() if run.d.enabled and not sync else contextlib.nullcontext()
    with ctx:
        with run.amp:
            if weights is None:
                _, loss = run.model(x, y)
                objective = loss
            else:
                _, per_token = run.model(x, y, reduction="none")  # 0 where the target is ignored (-1)
                scored = (y != -1).sum().clamp(min=1)
                loss = per_token.sum() / scored
                objective = (per_token * weights.view(-1)).sum() / scored
        run.scaler.scale(objective / run.cfg.train.grad_accum).backward()
    return loss


def optimizer_step(run: Run, step: int) -> None:
    """Clip the accumulated gradients and update the weights. In float16 the loss scaler unscales the gradients
    first and skips the update when they hold inf/NaN (then halves the scale): normal overflow, counted in
    run.skips without a host sync; only a long run of skips is reported as divergence (at the next log line).
    Elsewhere the scaler passes through."""
    scaler, t = run.scaler, run.cfg.train
    if scaler.is_enabled():
        scaler.unscale_(run.optimizer)
    if t.grad_clip > 0:
        norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), t.grad_clip)
    elif scaler.is_enabled():
        norm = torch.nn.utils.get_total_norm([p.grad for p in run.model.parameters() if p.grad is not None])
    if scaler.is_enabled():
        scaler.step(run.optimizer)
        scaler.update()
        run.skips.add(norm, step)
    else:
        run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)


def train_step(run: Run, step: int, lr: float, meter: LossMeter, first: bool = False) -> None:
    """Optimizer step `step` at learning rate `lr`: grad_accum micro-batches, then clipping and the update. On the
    `first` step of a process a torch.compile that fails (e.g. no C++ compiler) falls back to eager."""
    t = run.cfg.train
    apply_schedule(run.optimizer, step, lr, t)
    for micro in range(t.grad_accum):
        x, y, w = run.sampler.get(step, micro)
        sync = micro == t.grad_accum - 1
        try:
            loss = forward_backward(run, x, y, sync, w)
        except Exception as e:
            # only where the policy compiled the model (train.compile may ask for it where the policy says no: MPS,
            # Windows, CUDA without Triton) can a first-step error be compile's; out of memory never is
            if not (run.policy.compile and first and micro == 0) or isinstance(e, torch.cuda.OutOfMemoryError):
                raise
            run.fall_back_to_eager(e)
            loss = forward_backward(run, x, y, sync, w)
        meter.add(loss)
    meter.end_step(step)
    optimizer_step(run, step)


# -------------------------------------------------------------------------------------------------- loop


class Trainer:
    """The loop over a Run: steps, evaluations, logging and checkpoints, from a TrainState to the run's end."""

    def __init__(self, run: Run, state: TrainState, resumed: bool = False):
        self.run, self.state, self.resumed = run, state, resumed
        self.start_step = state.step
        self.length = RunLength.plan(run.cfg, run.batch.tokens, run.train_tokens, state, sync=run.from_rank0)
        self.reporter = Reporter(run.dir, run.cfg, run.d.main, self.length.logged_total or 0, self.start_step)
        self.meter = LossMeter(run.device)
        self.train_loss = float("nan")
        self.t_start = time.time()
        self.t_log, self.step_log = self.t_start, self.start_step

    def evaluate(self) -> dict:
        """Loss, perplexity and bits per byte on the fixed validation subset (shared out over the ranks)."""
        from tinystories.model.likelihood import likelihood

        run, d = self.run, self.run.d
        res = likelihood(run.raw_model, run.val_stream, run.val_bytes, run.cfg.model.max_seq_len,
                         batch_size=max(1, run.cfg.train.batch_size), autocast=run.amp, rank=d.rank,
                         world=d.world if d.enabled else 1)
        if d.enabled:
            t = torch.tensor([res["nats"], res["tokens"]], dtype=torch.float64, device=run.device)
            dist.all_reduce(t)
            res = {"nats": float(t[0]), "tokens": int(t[1]), "bytes": run.val_bytes}
        loss = res["nats"] / max(res["tokens"], 1)
        return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50)),
                "val_bpb": res["nats"] / math.log(2) / run.val_bytes}

    def sample_story(self) -> str:
        from tinystories.inference.sampling import SamplingParams, generate_texts

        model, cfg = self.run.raw_model, self.run.cfg
        model.eval()
        text = generate_texts(model, self.run.tok, cfg.train.sample_prompt,
                              SamplingParams(max_new_tokens=cfg.train.sample_tokens))[0]["text"]
        model.train()
        return text.replace("\n", " ")

    def save(self, step: int, is_best: bool, every_rank: bool = True) -> None:
        """A checkpoint of the run at `step` (rank 0 writes it). Every rank calls it (each one's RNG state is saved),
        except on Ctrl-C (`every_rank` False: rank 0 alone, with its own RNG state)."""
        run = self.run
        rngs = run.rng_states(gather=every_rank)
        if not run.d.main:
            return
        self.state.step = step
        self.state.total_steps = self.length.logged_total
        self.state.deadline_left_s = self.length.deadline_left()
        save_checkpoint(run.dir, run.raw_model, run.cfg, run.tok, self.state.to_dict(run.facts(step)),
                        run.trainer_state(rngs), is_best)
        self.reporter.print(f"checkpoint step {step} saved{' (best)' if is_best else ''}")

    def evaluate_and_save(self, step: int, final: bool) -> str | None:
        """Every evaluation, the final one too: validation metrics logged and printed, then (periodic ones) a
        sample story, a checkpoint and the early-stopping decision, returned as the reason to stop (or None)."""
        run, st = self.run, self.state
        ev = self.evaluate()
        improved = st.record_eval(ev["val_loss"], count_miss=not final)
        st.metrics = {**ev, "train_loss": self.train_loss}
        self.reporter.log({"kind": "val", "step": step, **run.position(step), **ev, "train_loss": self.train_loss,
                           "lr": self.length.lr(step), "time": time.time() - self.t_start}, None, self.length.total)
        line = f"val loss {ev['val_loss']:.4f} | ppl {ev['val_ppl']:.2f} | bpb {ev['val_bpb']:.4f}"
        if final:
            self.reporter.print(f"final eval step {step}: {line}")
            self.save(step, improved)
            return None
        self.reporter.print(f"eval step {step}: {line}{' (best)' if improved else ''}")
        if run.d.main:
            self.reporter.print(f"  sample: {self.sample_story()}")
        if step > self.start_step or st.init_from:  # fine-tuning: the starting model can stay the best
            self.save(step, improved)
        return st.early_stop(run.cfg.train.early_stopping_patience)

    def log_progress(self, step: int, lr: float, lr_total: int | None) -> None:
        """A train point in metrics.jsonl (and TensorBoard, wandb) and the progress line."""
        run = self.run
        mean_loss = self.train_loss = self.meter.mean(run.d)
        now = time.time()
        tps = (step - self.step_log) * run.batch.tokens / max(now - self.t_log, 1e-9)
        self.t_log, self.step_log = now, step
        flops = tps * run.flops_per_token / run.d.world  # achieved, per process (6N + attention per token)
        point = {"kind": "train", "step": step, **run.position(step), "loss": mean_loss, "lr": lr,
                 "total_steps": lr_total, "tokens_per_s": tps, "time": now - self.t_start, "gflops": flops / 1e9,
                 "cpu_s": time.process_time()}  # this process's CPU seconds (all threads): speed without the load
        if run.peak:
            point["mfu"] = flops / run.peak  # vs the GPU's datasheet / the CPU's measured matmul peak
        if run.scaler.is_enabled():
            point["loss_scale"], point["skipped_steps"] = run.scaler.get_scale(), run.skips.check()
        shown_total = "?" if self.length.provisional else self.length.total
        eta = self.length.seconds_left(step, now, tps, run.batch.tokens)
        self.reporter.log(point, progress_line(point, shown_total, eta, gflops=run.device.type == "cpu"),
                          self.length.total)

    def fit(self) -> dict:
        """Train to the end of the run (or an early stop, Ctrl-C, a non-finite loss); returns the summary."""
        run, t, length = self.run, self.run.cfg.train, self.length
        step = self.start_step
        stop_reason, status = "completed", 0
        run.model.train()
        try:
            while step < length.total:
                # evaluation (also at the first step of a fresh run: a baseline for the plot)
                if step % t.eval_interval == 0 and not (self.resumed and step == self.start_step):
                    t_eval = time.time()
                    stop = self.evaluate_and_save(step, final=False)
                    if stop:
                        stop_reason = stop
                        break
                    eval_s = time.time() - t_eval
                    self.t_log += eval_s  # tokens/s measures training; the budget counts evaluation
                    if length.deadline:  # the pace so far decides the length (rank 0's clock and decision)
                        replanned = length.replan(step, run.from_rank0(time.time()), eval_s, run.from_rank0)
                        if replanned:
                            run.log(replanned)
                lr, lr_total = length.lr(step), length.logged_total  # the rate and the length it was scheduled for
                t_step = time.time()
                train_step(run, step, lr, self.meter, first=step == self.start_step)
                step += 1
                length.record_step_time(step, time.time() - t_step)
                now = run.from_rank0(time.time()) if length.deadline else time.time()  # budget: rank 0's clock
                fixed = length.fix_budget(step, now, run.from_rank0)
                if fixed:
                    run.log(fixed)
                last = step >= length.total
                if step % t.log_interval == 0 or last:
                    self.log_progress(step, lr, lr_total)
                if step % t.checkpoint_interval == 0 and step % t.eval_interval and not last:
                    self.save(step, is_best=False)
                if not last:
                    length.stop_if_over_budget(step, now)
            if stop_reason == "completed":  # an early stop has just evaluated and saved this step: not twice
                self.evaluate_and_save(step, final=True)
        except NonFiniteLoss as e:
            # a NaN loss in float16 also makes its step's gradients overflow (one skip): only the scaler's own
            # give-up (MAX_SKIPPED_IN_A_ROW) is reported as overflow
            what = ("the gradients overflowed float16 at every loss scale"
                    if isinstance(e, ScalerGaveUp) else "the loss became NaN/inf")
            raise UserError(f"{what} at step {e.args[0]}; the last good checkpoint is kept in "
                            f"{checkpoints_dir(run.dir) / 'latest'}. Lower train.lr or raise warmup_steps, then "
                            f"`tinystories train --resume {run.dir}`") from None
        except KeyboardInterrupt:
            stop_reason, status = "interrupted", 130
            if step > self.start_step and run.d.main:
                self.reporter.print(f"interrupted at step {step}: saving a checkpoint ...")
                self.save(step, is_best=False, every_rank=False)
        except torch.cuda.OutOfMemoryError:
            raise UserError(f"GPU out of memory with a micro-batch of {t.batch_size}: use a smaller --set "
                            f"train.batch_size with a larger train.grad_accum (same global batch), or --micro-batch "
                            f"auto") from None
        finally:
            self.reporter.close()
        return self.finish(step, stop_reason, status)

    def finish(self, step: int, stop_reason: str, status: int) -> dict:
        run, best = self.run, self.state.best_val_loss
        if run.d.main:
            if stop_reason == "interrupted":
                print(f"stopped at step {step}. continue with: tinystories train --resume {run.dir}")
            else:
                print(f"done: {stop_reason} at step {step} in {fmt_clock(time.time() - self.t_start)}; "
                      f"best val loss {best:.4f}; checkpoints in {checkpoints_dir(run.dir)}")
        return {"step": step, "status": status, "run_dir": str(run.dir), "metrics": self.state.metrics,
                "best_val_loss": best}


def train(cfg: RunConfig, resume: bool = False, init_from: str | None = None, micro_batch: str | None = None) -> dict:
    """Train a run. Returns a summary dict (final step, val metrics, paths)."""
    d = init_distributed(cfg.train.device)
    run, state = setup(cfg, d, resume, init_from, micro_batch)
    result = Trainer(run, state, resumed=resume).fit()
    del run  # the DDP wrapper, before the process group goes
    # Teardown on success only: after an error a peer may sit inside a collective, where a (collective) destroy
    # could hang; the process exits non-zero and torchrun stops the others. On success every rank first waits for
    # rank 0's final checkpoint: a rank that destroyed gloo's group while a peer was still busy once aborted at
    # exit ("terminate called without an active exception", SIGABRT) after a finished run.
    if d.enabled and dist.is_initialized():
        gc.collect()  # free the DDP wrapper (held in reference cycles) and its hold on the process group now
        dist.barrier()
        dist.destroy_process_group()
    return result
