"""The training loop: `tinystories train`.

Packed windows of context+1 tokens are drawn at random offsets from the memory-mapped cache (no padding);
the offsets of step s, micro-step m on rank r come from a generator seeded with (seed, s, m, r), so a resumed
run draws exactly the windows the uninterrupted run would have. AdamW, or Muon for the blocks' matrices (optim.py),
linear warmup then a cosine (or linear, or warmup-stable-decay) decay to min_lr, gradient accumulation and clipping,
the device policy's autocast (bf16 where the hardware has it; float16 with a GradScaler), optional torch.compile,
DDP under torchrun.

The parts, in the order a run uses them:
    setup()          -> Run         device, data, model, batch geometry, optimizer, compile/DDP wrapping
    TrainState                      what a checkpoint's state.json records and a resume reads back
    RunLength                       total steps, the time budget's provisional length, the learning rate
    train_step()                    micro-batches, accumulation, clipping, the optimizer step
    Trainer.evaluate_and_save()     every evaluation (the last one too): log, sample, checkpoint, early stop
    Trainer.fit()                   the loop
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from tinystories.core.config import (
    RunConfig,
    format_validation_error,
    load_config,
    parse_scalar,
    save_config,
    set_items,
)
from tinystories.core.errors import UserError
from tinystories.data.cache import TokenCache
from tinystories.data.tokenizer import TextTokenizer, copy_tokenizer, tokenizer_file_name
from tinystories.model.checkpoint import (
    WEIGHTS,
    Checkpoint,
    check_compatible,
    load_trainer_state,
    load_weights,
    read_checkpoint,
    resolve_checkpoint,
    save_checkpoint,
)
from tinystories.model.device import (  # noqa: F401 (PEAK_BF16_FLOPS, cpu_has_bf16, peak_flops: also imported from here)
    PEAK_BF16_FLOPS,
    DevicePolicy,
    Dist,
    autocast_ctx,
    choose_policy,
    cpu_has_bf16,
    detect_caps,
    init_distributed,
    peak_flops,
    pick_device,
    pick_dtype,
)
from tinystories.model.transformer import Transformer
from tinystories.training.optim import (
    apply_schedule,
    check_optimizer_state,
    make_optimizer,
    zero_init_residual_projections,
)
from tinystories.training.schedule import PROVISIONAL_TOTAL, Schedule, effective_warmup, lr_at  # noqa: F401 (re-exported)


def _quiet(*args, **kwargs) -> None:
    """The log of a rank other than 0 (only rank 0 prints)."""


# -------------------------------------------------------------------------------------------------- data


class WindowSampler:
    """Random windows of seq_len+1 tokens from the packed train stream, reproducible per (step, micro, rank)."""

    def __init__(self, cache: TokenCache, seq_len: int, batch: int, seed: int, rank: int, device: torch.device,
                 world: int = 1):
        split = cache.split("train")
        self.shards = [s for s in split.shards if len(s) > seq_len + 1]
        if not self.shards:
            raise UserError(f"{cache.path}: the training split has fewer than {seq_len + 2} tokens; use more text or "
                            f"a shorter context")
        sizes = np.array([len(s) - seq_len - 1 for s in self.shards], dtype=np.float64)
        self.shard_p = sizes / sizes.sum()
        self.seq_len, self.batch, self.seed, self.rank, self.device = seq_len, batch, seed, rank, device
        self.world = world
        self.pin = device.type == "cuda"

    def get(self, step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        # seeded by the global micro-batch index micro * world + rank: rank r's micro-step m under DDP draws the
        # windows of micro-step m * world + r of a single process with world x the accumulation (same data;
        # a single process draws exactly what it drew before, (seed, step, micro, 0))
        rng = np.random.default_rng((self.seed, step, micro * self.world + self.rank, 0))
        shard_idx = (rng.choice(len(self.shards), size=self.batch, p=self.shard_p) if len(self.shards) > 1
                     else np.zeros(self.batch, int))
        rows = []
        for si in shard_idx:
            shard = self.shards[si]
            o = int(rng.integers(0, len(shard) - self.seq_len - 1))
            rows.append(shard[o : o + self.seq_len + 1])
        buf = torch.from_numpy(np.stack(rows).astype(np.int64))
        if self.pin:
            buf = buf.pin_memory()
        buf = buf.to(self.device, non_blocking=True)
        return buf[:, :-1], buf[:, 1:]


def validation_subset(cache: TokenCache, tok: TextTokenizer, max_tokens: int) -> tuple[np.ndarray, int]:
    """The fixed validation subset (train.eval_tokens): the first max_tokens predicted tokens of the validation
    split and their exact UTF-8 byte count, cut by likelihood.cut_split, as `eval --max-tokens` cuts it."""
    from tinystories.model.likelihood import cut_split

    split = cache.split("val")
    if split.tokens < 2:
        split = cache.split("train")  # no held-out text at all: measure on the train split (said in the log)
    return cut_split(split, tok, max_tokens)


# ---------------------------------------------------------------------------------------------- schedule


BUDGET_MEASURE_STEPS = 10  # a time budget fixes the run length after this many steps (or at its deadline)
BUDGET_MARGIN = 1.08  # the measured step time is stretched by this much when the budget is turned into steps
BUDGET_GRACE_S = 5  # a run still going this long after its deadline (a slow machine) finishes at once


def require_run_length(cfg: RunConfig) -> None:
    t = cfg.train
    if not (t.max_steps or t.max_tokens or t.epochs or t.max_minutes):
        raise UserError("set the run length: --set train.max_steps=N (or train.max_tokens, train.epochs, "
                        "train.max_minutes)")


def configured_steps(cfg: RunConfig, tokens_per_step: int, train_tokens: int) -> int | None:
    """The run length the config sets in steps (max_steps > max_tokens > epochs), or None for a time budget."""
    require_run_length(cfg)
    t = cfg.train
    if t.max_steps:
        return t.max_steps
    if t.max_tokens:
        return max(1, math.ceil(t.max_tokens / tokens_per_step))
    if t.epochs:
        return max(1, math.ceil(t.epochs * train_tokens / tokens_per_step))
    return None  # train.max_minutes: the length is measured during the first steps


@dataclass
class RunLength:
    """The run's length in optimizer steps, and so its learning-rate schedule.

    A length in steps, tokens or epochs is known from the start. A time budget (train.max_minutes) is provisional
    (PROVISIONAL_TOTAL: a warmup-only schedule) until BUDGET_MEASURE_STEPS steps have measured the step time (or the
    deadline has passed); it is then fixed early, so that a budget shorter than the configured warmup still gets a
    short warmup and a full decay. A resumed run keeps the length its budget fixed; a resumed run given a new
    max_steps (tokens, epochs) stretches the cosine to it. Under DDP `now` is rank 0's clock and `sync` makes
    rank 0's decision everyone's, so that every rank runs the same number of steps."""

    cfg: RunConfig
    total: int
    start_step: int = 0
    deadline: float | None = None  # time.time() at which a time budget ends
    provisional: bool = False
    t_start: float = field(default_factory=time.time)
    measured_steps: int = 0
    measured_time: float = 0.0

    @classmethod
    def plan(cls, cfg: RunConfig, tokens_per_step: int, train_tokens: int, saved: TrainState | None = None,
             now: float | None = None, sync: Callable[[float], float] = float) -> RunLength:
        saved = saved or TrainState()
        now = time.time() if now is None else now
        total = configured_steps(cfg, tokens_per_step, train_tokens)
        if total is None and saved.total_steps:
            total = saved.total_steps  # a resumed time-budget run: the length its budget fixed
        deadline = None
        if cfg.train.max_minutes and total is None:
            deadline = sync(now + (saved.deadline_left_s or cfg.train.max_minutes * 60))
        if total is None:
            return cls(cfg, max(saved.step + 1, PROVISIONAL_TOTAL), saved.step, deadline, True, now)
        return cls(cfg, total, saved.step, deadline, False, now)

    def lr(self, step: int) -> float:
        return lr_at(step, self.cfg, self.total)

    @property
    def logged_total(self) -> int | None:
        """The length the schedule is set for, None while provisional (as metrics.jsonl and state.json record it)."""
        return None if self.provisional else self.total

    def record_step_time(self, step: int, seconds: float) -> None:
        """The time of the step that ended at `step`; the first steps (allocation, compilation) are not counted."""
        if step - self.start_step > 2:
            self.measured_steps += 1
            self.measured_time += seconds

    def fix_budget(self, step: int, now: float, sync: Callable[[float], float] = float) -> str | None:
        """After step `step`: fix a provisional length once it has been measured; returns the line to log then."""
        if not (self.provisional and (step >= self.start_step + BUDGET_MEASURE_STEPS or now > self.deadline)):
            return None
        per_step = (self.measured_time / self.measured_steps if self.measured_steps
                    else (time.time() - self.t_start) / max(step - self.start_step, 1))
        total = max(step + 1, step + int((self.deadline - now) / (per_step * BUDGET_MARGIN)))
        self.total = int(sync(total))
        self.provisional = False
        return (f"time budget: {self.cfg.train.max_minutes:g} min -> {self.total} steps "
                f"({per_step * 1000:.0f} ms/step, evaluation included)")

    def stop_if_over_budget(self, step: int, now: float) -> None:
        if self.deadline and now > self.deadline + BUDGET_GRACE_S:
            self.total = step  # over budget (a slow machine): finish now

    def deadline_left(self) -> float | None:
        return (self.deadline - time.time()) if self.deadline else None

    def seconds_left(self, step: int, now: float, tokens_per_s: float, tokens_per_step: int) -> float:
        if self.provisional and self.deadline:
            return self.deadline - now
        return (self.total - step) * tokens_per_step / max(tokens_per_s, 1e-9)


# ------------------------------------------------------------------------------------------------- state


@dataclass
class TrainState:
    """What a checkpoint records about the run's progress (state.json) and a resumed run reads back."""

    step: int = 0
    total_steps: int | None = None  # the run length when the checkpoint was saved; None: a budget still measuring
    metrics: dict = field(default_factory=dict)  # of the last evaluation
    best_val_loss: float = math.inf
    evals_without_improvement: int = 0
    deadline_left_s: float | None = None  # what is left of a time budget
    init_from: str | None = None  # the checkpoint a fine-tuning run started from

    def record_eval(self, val_loss: float, count_miss: bool = True) -> bool:
        """A new validation loss: True when it is the best so far. A periodic evaluation that is not counts toward
        early stopping; the final one does not (`count_miss` False)."""
        improved = val_loss < self.best_val_loss
        if improved:
            self.best_val_loss, self.evals_without_improvement = val_loss, 0
        elif count_miss:
            self.evals_without_improvement += 1
        return improved

    def early_stop(self, patience: int | None) -> str | None:
        """The reason to stop, when `patience` evaluations in a row have not improved."""
        if patience and self.evals_without_improvement >= patience:
            return f"early stop: no val improvement in {self.evals_without_improvement} evaluations"
        return None

    def to_dict(self, facts: dict | None = None) -> dict:
        """state.json: these fields, with `facts` about the run beside them for readers (tokens, epoch, cache_dir,
        global_batch, world_size, n_params; from_dict does not read them back: they follow from the run)."""
        facts = facts or {}
        out = {"step": self.step, "tokens": facts.get("tokens"), "epoch": facts.get("epoch"),
               "total_steps": self.total_steps, "cache_dir": facts.get("cache_dir"), "metrics": self.metrics,
               "best_val_loss": self.best_val_loss, "evals_without_improvement": self.evals_without_improvement,
               "global_batch": facts.get("global_batch"), "world_size": facts.get("world_size"),
               "n_params": facts.get("n_params"), "deadline_left_s": self.deadline_left_s}
        if self.init_from:
            out["init_from"] = self.init_from
        return out

    @classmethod
    def from_dict(cls, d: dict) -> TrainState:
        """From a state.json, of this version or an older one (a missing key takes its default)."""
        return cls(step=int(d.get("step", 0)), total_steps=d.get("total_steps"), metrics=d.get("metrics") or {},
                   best_val_loss=d.get("best_val_loss", math.inf),
                   evals_without_improvement=d.get("evals_without_improvement", 0),
                   deadline_left_s=d.get("deadline_left_s"), init_from=d.get("init_from"))


# --------------------------------------------------------------------------------------------- optimizer


# make_optimizer (optim.py) builds the optimizer train.optimizer names; apply_schedule sets its rates each step.


# --------------------------------------------------------------------------------------------- reporting


def fmt_count(n: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def fmt_secs(s: float) -> str:
    s = max(0, int(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class Reporter:
    """Progress bar (rich, on a terminal) or plain log lines, metrics.jsonl, TensorBoard and wandb."""

    def __init__(self, run_dir: Path, cfg: RunConfig, enabled: bool, total_steps: int, start_step: int):
        from tinystories.core.metrics import drop_torn_tail, metrics_path

        self.enabled = enabled
        self.metrics = None
        if enabled:
            drop_torn_tail(metrics_path(run_dir))  # a killed run's half-written line would glue onto the next one
            self.metrics = open(metrics_path(run_dir), "a")
            # this segment's schedule (a resume may change it with --set): doctor checks its points against it
            self.metrics.write(json.dumps({"kind": "segment", "step": start_step,
                                           "schedule": Schedule.of(cfg.train).to_dict()}) + "\n")
            self.metrics.flush()
        self.tb = self.wandb = None
        self.progress = None
        if not enabled:
            return
        if cfg.train.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError:
                print("note: tensorboard is not installed (pip install tensorboard); TensorBoard logging is off")
        if cfg.train.wandb:
            try:
                import wandb

                self.wandb = wandb.init(project=cfg.train.wandb_project, dir=str(run_dir), config=cfg.model_dump())
            except ImportError:
                print("note: wandb is not installed; wandb logging is off")
        if sys.stdout.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(
                TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                TimeRemainingColumn(), refresh_per_second=4,
            )
            self.task = self.progress.add_task("train", total=total_steps, completed=start_step, info="")
            self.progress.start()

    def print(self, text: str) -> None:
        if not self.enabled:
            return
        if self.progress:
            self.progress.console.print(text, highlight=False, markup=False)
        else:
            print(text, flush=True)

    def log(self, point: dict, line: str | None, total_steps: int) -> None:
        if not self.enabled:
            return
        self.metrics.write(json.dumps(point) + "\n")
        self.metrics.flush()
        scalars = {k: v for k, v in point.items() if isinstance(v, (int, float)) and k not in ("step", "kind")}
        if self.tb:
            for k, v in scalars.items():
                self.tb.add_scalar(f"{point['kind']}/{k}", v, point["step"])
        if self.wandb:
            self.wandb.log({f"{point['kind']}/{k}": v for k, v in scalars.items()}, step=point["step"])
        if self.progress:
            self.progress.update(self.task, completed=point["step"], total=total_steps, info=line or "")
        elif line:
            print(line, flush=True)

    def close(self) -> None:
        if self.progress:
            self.progress.stop()
        if self.metrics:
            self.metrics.close()
        if self.tb:
            self.tb.close()
        if self.wandb:
            self.wandb.finish()


# ------------------------------------------------------------------------------------------------- setup


@dataclass
class Run:
    """Everything a run trains with, built once by setup()."""

    cfg: RunConfig
    d: Dist
    device: torch.device
    dtype: torch.dtype
    tok: TextTokenizer
    cache: TokenCache
    raw_model: Transformer  # the model itself: evaluated, sampled, saved
    model: torch.nn.Module  # what the steps run: raw_model compiled and/or wrapped in DDP
    optimizer: torch.optim.Optimizer
    policy: DevicePolicy
    sampler: WindowSampler
    val_stream: np.ndarray
    val_bytes: int
    log: Callable[..., None] = print

    def __post_init__(self) -> None:
        t = self.cfg.train
        self.dir = Path(self.cfg.out_dir)
        self.global_batch = t.batch_size * t.grad_accum * self.d.world
        self.tokens_per_step = self.global_batch * self.cfg.model.max_seq_len
        self.train_tokens = self.cache.manifest["splits"]["train"]["tokens"]
        self.amp = autocast_ctx(self.device, self.dtype)
        # float16: loss scaling; otherwise a pass-through
        self.scaler = self.policy.make_grad_scaler(self.cfg.train.loss_scale_init)
        self.skips = ScalerSkips(self.device)  # float16: the updates the scaler skipped, counted on the device
        self.peak = peak_flops(self.device, self.dtype)
        self.flops_per_token = self.raw_model.flops_per_token()
        self.n_params = self.raw_model.num_params()

    def from_rank0(self, value: float) -> float:
        """DDP: rank 0's value on every rank (so that every rank runs the same number of steps)."""
        if not self.d.enabled:
            return value
        t = torch.tensor([float(value)], dtype=torch.float64, device=self.device)
        dist.broadcast(t, 0)
        return float(t)

    def position(self, step: int) -> dict:
        return {"tokens": step * self.tokens_per_step, "epoch": step * self.tokens_per_step / self.train_tokens}

    def facts(self, step: int) -> dict:
        """What a checkpoint's state.json says about the run beside its TrainState."""
        return {**self.position(step), "cache_dir": str(self.cache.path.resolve()), "global_batch": self.global_batch,
                "world_size": self.d.world, "n_params": self.n_params}

    def rng_states(self, gather: bool = True) -> dict[str, list[torch.Tensor]]:
        """The RNG states (CPU, and CUDA on a GPU) of every rank, indexed by rank: under DDP each rank's own state
        (dropout draws differ per rank), gathered with a collective that every rank must call; `gather` False
        (rank 0 alone, e.g. on Ctrl-C): this rank's only."""
        states = {"cpu_rng": torch.get_rng_state()}
        if self.device.type == "cuda":
            states["cuda_rng"] = torch.cuda.get_rng_state()
        if not (self.d.enabled and gather):
            return {k: [v] for k, v in states.items()}
        out = {}
        for key, state in states.items():  # the same size on every rank
            mine = state.to(self.device)
            every = [torch.empty_like(mine) for _ in range(self.d.world)]
            dist.all_gather(every, mine)
            out[key] = [t.cpu() for t in every]
        return out

    def trainer_state(self, rngs: dict[str, list[torch.Tensor]]) -> dict:
        """trainer.pt: the optimizer's state, the loss scaler's (float16) and every rank's RNG states (rng_states)."""
        ts = {"optimizer": self.optimizer.state_dict(), **rngs}
        if self.scaler.is_enabled():
            ts["scaler"] = {**self.scaler.state_dict(), **self.skips.state_dict()}
        return ts

    def load_trainer_state(self, ts: dict) -> None:
        # the saved state brings back its groups' hyperparameters too; this run's config (a resume may --set
        # train.lr, weight decay, ...) decides them, so the optimizer runs at the rate the run logs
        fresh = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        self.optimizer.load_state_dict(ts["optimizer"])
        for group, hyper in zip(self.optimizer.param_groups, fresh):
            group.update(hyper)
        if self.scaler.is_enabled() and "scaler" in ts:
            self.skips.load_state_dict(ts["scaler"])  # pops its keys; the rest is the scaler's
            self.scaler.load_state_dict(ts["scaler"])
        # this rank's own RNG states: a list by rank (an older trainer.pt holds one state, rank 0's); a rank the
        # checkpoint has none for (more processes than saved it, or a Ctrl-C save) keeps its seed's (seed + rank)
        for key, restore in (("cpu_rng", torch.set_rng_state), ("cuda_rng", torch.cuda.set_rng_state)):
            states = ts.get(key)
            states = [states] if isinstance(states, torch.Tensor) else (states or [])
            if self.d.rank < len(states) and (key == "cpu_rng" or self.device.type == "cuda"):
                restore(states[self.d.rank])

    def fall_back_to_eager(self, error: Exception) -> None:
        """torch.compile failed on the first call (e.g. no C++ compiler): train the model uncompiled."""
        self.log(f"warning: torch.compile failed ({str(error).strip().splitlines()[0][:120]}); training without it")
        self.model = wrap_model(self.raw_model, self.d, self.device, compile=False)
        self.optimizer.zero_grad(set_to_none=True)


def wrap_model(model: Transformer, d: Dist, device: torch.device, compile: bool) -> torch.nn.Module:
    """The model the training steps run: compiled (torch.compile) and/or wrapped in DDP under torchrun."""
    if compile:
        model = torch.compile(model)
    if d.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(model, device_ids=[d.local_rank] if device.type == "cuda" else None)
    return model


def load_run_data(cfg: RunConfig, d: Dist, log) -> tuple[TextTokenizer, TokenCache]:
    """The run's tokenizer and token cache: rank 0 builds what is missing, the others wait and then find it cached.
    Fills model.vocab_size from the tokenizer (0 = follow it)."""
    from tinystories.data.prepare import ensure_run_data

    if d.main:
        tok, cache = ensure_run_data(cfg, log)
    if d.enabled:
        dist.barrier()
    if not d.main:
        tok, cache = ensure_run_data(cfg, _quiet)
    cache.check_tokenizer(tok)
    if cfg.model.vocab_size == 0:
        cfg.model.vocab_size = tok.vocab_size
    elif cfg.model.vocab_size != tok.vocab_size:
        raise UserError(f"model.vocab_size={cfg.model.vocab_size} but the tokenizer {tok.path} has {tok.vocab_size} "
                        f"tokens (set 0 to follow the tokenizer)")
    return tok, cache


def find_micro_batch(cfg: RunConfig, d: Dist, device: torch.device, dtype: torch.dtype) -> int:
    """The largest micro-batch whose estimated peak memory (memory.py) fits on this GPU and divides the sequences
    each process trains per step, so that accumulation keeps the global batch; the configured one elsewhere."""
    from tinystories.training.memory import cuda_budget, pick_micro_batch

    t = cfg.train
    if device.type != "cuda":
        return t.batch_size
    per_process = t.global_batch // d.world if t.global_batch else t.batch_size * t.grad_accum
    b, _ = pick_micro_batch(cfg.model, per_process, cuda_budget(device), dtype, optimizer=t.optimizer,
                            ddp=d.enabled)
    return b


def set_batch_geometry(cfg: RunConfig, model: Transformer, d: Dist, device: torch.device, dtype: torch.dtype,
                       micro_batch: str | None, log) -> None:
    """train.batch_size (the micro-batch: --micro-batch N, or auto: the largest that fits) and train.grad_accum
    (from train.global_batch when it is set)."""
    t = cfg.train
    if micro_batch is None and device.type == "cuda":
        micro_batch = "auto"  # on a GPU the micro-batch follows its memory; the global batch stays the config's
    if micro_batch == "auto" and device.type == "cuda":
        per_step = t.global_batch or t.batch_size * t.grad_accum * d.world
        t.batch_size = find_micro_batch(cfg, d, device, dtype)
        if not t.global_batch:
            t.global_batch = per_step
        log(f"--micro-batch auto: {t.batch_size} sequences fit (memory estimate), accumulation keeps "
            f"{per_step} sequences per step")
    elif micro_batch:
        t.batch_size = int(micro_batch)
    if t.global_batch:
        per = t.batch_size * d.world
        if t.global_batch % per and micro_batch == "auto":
            while t.batch_size > 1 and t.global_batch % (t.batch_size * d.world):
                t.batch_size //= 2
            per = t.batch_size * d.world
        if t.global_batch % per:
            raise UserError(f"train.global_batch={t.global_batch} is not a multiple of micro-batch x processes = {per}")
        t.grad_accum = t.global_batch // per


def setup(cfg: RunConfig, d: Dist, resume: bool = False, init_from: str | None = None,
          micro_batch: str | None = None) -> tuple[Run, TrainState]:
    """Build a run: device, data, model (fresh, resumed or --init-from), batch geometry, optimizer, compile/DDP.
    Returns it with the state to continue from (a fresh TrainState for a new run)."""
    require_run_length(cfg)
    run_dir = Path(cfg.out_dir)
    log = print if d.main else _quiet
    device = pick_device(cfg.train.device, d)
    policy = choose_policy(detect_caps(device), cfg.train)
    dtype = policy.dtype
    policy.apply()
    tok, cache = load_run_data(cfg, d, log)

    state, trainer_state = TrainState(), None
    if resume:
        ck = read_checkpoint(run_dir, prefer="latest")
        check_compatible(ck, cfg, tok, resume=True, where=run_dir)
        trainer_state, state = load_trainer_state(ck.path), TrainState.from_dict(ck.state)
        check_optimizer_state(cfg.train.optimizer, trainer_state["optimizer"])  # before anything is written
    torch.manual_seed(cfg.train.seed + d.rank)
    model = Transformer(cfg.model)
    if resume:
        load_weights(model, ck.path)
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

    set_batch_geometry(cfg, model, d, device, dtype, micro_batch, log)
    t = cfg.train
    if t.zero_init_residual and not (resume or init_from):
        zero_init_residual_projections(model)
    global_batch = t.batch_size * t.grad_accum * d.world
    log(f"batch: {t.batch_size} x {t.grad_accum} accumulation x {d.world} process(es) = {global_batch} sequences = "
        f"{global_batch * m.max_seq_len:,} tokens per step; device {device}, {str(dtype).removeprefix('torch.')}"
        f"{', compiled' if policy.compile else ''}")
    log(policy.describe())
    optimizer = make_optimizer(model, t, device)
    wrapped = wrap_model(model, d, device, policy.compile)
    if trainer_state is not None:
        log(f"resumed from {ck.path} at step {state.step}")
    if d.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    sampler = WindowSampler(cache, m.max_seq_len, t.batch_size, t.seed, d.rank, device, d.world)
    val_stream, val_bytes = validation_subset(cache, tok, t.eval_tokens)
    run = Run(cfg, d, device, dtype, tok, cache, model, wrapped, optimizer, policy, sampler, val_stream, val_bytes,
              log)
    if trainer_state is not None:
        run.load_trainer_state(trainer_state)  # the optimizer's state and the RNGs, last
    return run, state


# -------------------------------------------------------------------------------------------------- step


class NonFiniteLoss(Exception):
    pass


class LossMeter:
    """The train loss between two log lines, summed on the device (no host sync per step), and the first step
    whose loss was not finite."""

    def __init__(self, device: torch.device):
        self.device = device
        self.sum = torch.zeros((), device=device)
        self.n = 0
        self.bad_step = torch.full((), -1, dtype=torch.long, device=device)

    def add(self, loss: torch.Tensor) -> None:
        self.sum += loss.detach()
        self.n += 1

    def end_step(self, step: int) -> None:
        finite = torch.isfinite(self.sum)
        self.bad_step = torch.where((~finite) & (self.bad_step < 0), torch.tensor(step, device=self.device),
                                    self.bad_step)

    def mean(self, d: Dist) -> float:
        """The mean loss since the last call, over every rank's micro-batches (the one host sync, at log
        intervals). Raises NonFiniteLoss(step) when a step's loss was NaN or infinite."""
        if d.enabled:
            dist.all_reduce(self.sum)
            self.sum /= d.world
            dist.all_reduce(self.bad_step, op=dist.ReduceOp.MAX)
        mean = float(self.sum) / max(self.n, 1)
        if int(self.bad_step) >= 0:
            raise NonFiniteLoss(int(self.bad_step))
        self.sum.zero_()
        self.n = 0
        return mean


def forward_backward(run: Run, x: torch.Tensor, y: torch.Tensor, sync: bool) -> torch.Tensor:
    """One micro-batch: the loss, and its share of the gradient (DDP synchronises gradients only when `sync`)."""
    ctx = run.model.no_sync() if run.d.enabled and not sync else contextlib.nullcontext()
    with ctx:
        with run.amp:
            _, loss = run.model(x, y)
        run.scaler.scale(loss / run.cfg.train.grad_accum).backward()
    return loss


MAX_SKIPPED_IN_A_ROW = 30  # float16: the scale halves at each skipped step; 30 in a row is divergence, not overflow


class ScalerGaveUp(NonFiniteLoss):
    """float16: MAX_SKIPPED_IN_A_ROW updates in a row were skipped (overflow at every loss scale tried)."""


class ScalerSkips:
    """float16: the optimizer steps the loss scaler skipped, counted on the device like LossMeter's loss (no host
    sync per step; read at log intervals). The scaler skips a step when the unscaled gradients hold inf/NaN, which
    is when their total norm is not finite: that norm is what is counted."""

    def __init__(self, device: torch.device):
        self.total = torch.zeros((), dtype=torch.long, device=device)
        self.in_a_row = torch.zeros((), dtype=torch.long, device=device)
        self.gave_up_at = torch.full((), -1, dtype=torch.long, device=device)

    def add(self, grad_norm: torch.Tensor, step: int) -> None:
        skipped = (~torch.isfinite(grad_norm)).long()
        self.total += skipped
        self.in_a_row.mul_(skipped).add_(skipped)  # +1 if skipped, else back to 0
        self.gave_up_at = torch.where((self.in_a_row >= MAX_SKIPPED_IN_A_ROW) & (self.gave_up_at < 0),
                                      torch.tensor(step, device=grad_norm.device), self.gave_up_at)

    def check(self) -> int:
        """The steps skipped so far (one host sync); raises ScalerGaveUp(step) after a long run of skips."""
        if int(self.gave_up_at) >= 0:
            raise ScalerGaveUp(int(self.gave_up_at))
        return int(self.total)

    def state_dict(self) -> dict:
        return {"skipped_steps": int(self.total), "skipped_in_a_row": int(self.in_a_row)}

    def load_state_dict(self, sd: dict) -> None:
        self.total.fill_(sd.pop("skipped_steps", 0))
        self.in_a_row.fill_(sd.pop("skipped_in_a_row", 0))


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
        x, y = run.sampler.get(step, micro)
        sync = micro == t.grad_accum - 1
        try:
            loss = forward_backward(run, x, y, sync)
        except Exception as e:
            # only where the policy compiled the model (train.compile may ask for it where the policy says no: MPS,
            # Windows, CUDA without Triton) can a first-step error be compile's; out of memory never is
            if not (run.policy.compile and first and micro == 0) or isinstance(e, torch.cuda.OutOfMemoryError):
                raise
            run.fall_back_to_eager(e)
            loss = forward_backward(run, x, y, sync)
        meter.add(loss)
    meter.end_step(step)
    optimizer_step(run, step)


# -------------------------------------------------------------------------------------------------- loop


class Trainer:
    """The loop over a Run: steps, evaluations, logging and checkpoints, from a TrainState to the run's end."""

    def __init__(self, run: Run, state: TrainState, resumed: bool = False):
        self.run, self.state, self.resumed = run, state, resumed
        self.start_step = state.step
        self.length = RunLength.plan(run.cfg, run.tokens_per_step, run.train_tokens, state, sync=run.from_rank0)
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
        tps = (step - self.step_log) * run.tokens_per_step / max(now - self.t_log, 1e-9)
        self.t_log, self.step_log = now, step
        flops = tps * run.flops_per_token / run.d.world  # achieved, per process (6N + attention per token)
        mfu = flops / run.peak if run.peak else None  # vs the GPU's datasheet / the CPU's measured matmul peak
        point = {"kind": "train", "step": step, **run.position(step), "loss": mean_loss, "lr": lr,
                 "total_steps": lr_total, "tokens_per_s": tps, "time": now - self.t_start, "gflops": flops / 1e9,
                 "cpu_s": time.process_time()}  # this process's CPU seconds (all threads): speed without the load
        if mfu is not None:
            point["mfu"] = mfu
        scale = ""
        if run.scaler.is_enabled():
            point["loss_scale"], point["skipped_steps"] = run.scaler.get_scale(), run.skips.check()
            scale = f" | scale {point['loss_scale']:.0e} ({point['skipped_steps']} skipped)"
        shown_total = "?" if self.length.provisional else self.length.total
        eta = self.length.seconds_left(step, now, tps, run.tokens_per_step)
        line = (f"step {step}/{shown_total} | epoch {point['epoch']:.2f} | tokens {fmt_count(point['tokens'])} | "
                f"loss {mean_loss:.4f} | lr {lr:.2e} | {fmt_count(tps)} tok/s"
                + (f" | {flops / 1e9:.3g} GFLOP/s" if run.device.type == "cpu" else "")
                + (f" | MFU {mfu:.1%}" if mfu is not None else "") + scale + f" | eta {fmt_secs(eta)}")
        self.reporter.log(point, line, self.length.total)

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
                    self.t_log += time.time() - t_eval  # tokens/s measures training; the budget counts evaluation
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
            self.reporter.close()
            # a NaN loss in float16 also makes its step's gradients overflow (one skip): only the scaler's own
            # give-up (MAX_SKIPPED_IN_A_ROW) is reported as overflow
            what = ("the gradients overflowed float16 at every loss scale"
                    if isinstance(e, ScalerGaveUp) else "the loss became NaN/inf")
            raise UserError(f"{what} at step {e.args[0]}; the last good checkpoint is kept in "
                            f"{run.dir / 'checkpoints' / 'latest'}. Lower train.lr or raise warmup_steps, then "
                            f"`tinystories train --resume {run.dir}`") from None
        except KeyboardInterrupt:
            stop_reason, status = "interrupted", 130
            if step > self.start_step and run.d.main:
                self.reporter.print(f"interrupted at step {step}: saving a checkpoint ...")
                self.save(step, is_best=False, every_rank=False)
        except torch.cuda.OutOfMemoryError:
            self.reporter.close()
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
                print(f"done: {stop_reason} at step {step} in {fmt_secs(time.time() - self.t_start)}; "
                      f"best val loss {best:.4f}; checkpoints in {run.dir / 'checkpoints'}")
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


# --------------------------------------------------------------------------------------------------- CLI


def _configured_tokenizer(cfg: RunConfig) -> Path | None:
    """The tokenizer file a run's config names (tokenizer.path, else data_dir/tokenizer-VOCAB), or None when it
    does not exist yet (it would be trained)."""
    from tinystories.data.prepare import DEFAULT_TOKENIZER_DIR
    from tinystories.data.tokenizer import find_tokenizer_file

    if cfg.tokenizer.path:
        return find_tokenizer_file(cfg.tokenizer.path)  # a missing path is an error
    f = Path(cfg.data.data_dir) / f"{DEFAULT_TOKENIZER_DIR}-{cfg.tokenizer.vocab_size}" / "tokenizer.json"
    return f if f.is_file() else None


def _check_run_dir(run_dir: Path) -> None:
    """--resume RUN_DIR names a run directory with a checkpoint to continue from."""
    hint = "pass a run directory made by `tinystories train`, e.g. runs/cpu"
    if not run_dir.exists():
        raise UserError(f"--resume {run_dir}: no such run directory; {hint}")
    if not run_dir.is_dir():
        raise UserError(f"--resume {run_dir}: not a directory; {hint}")
    if (run_dir / WEIGHTS).is_file():  # a checkpoint directory, not a run directory
        run = run_dir.resolve().parent.parent
        if (run_dir / "trainer.pt").is_file() and run_dir.resolve().parent.name == "checkpoints" and \
                (run / "config.yaml").is_file():
            raise UserError(f"--resume {run_dir}: a checkpoint inside the run {run}; resume the run: "
                            f"--resume {run}")
        raise UserError(f"--resume {run_dir}: not a training run (an imported/exported checkpoint): fine-tune it "
                        f"with --init-from {run_dir} --out NEW_RUN")
    if not (run_dir / "config.yaml").is_file():
        raise UserError(f"--resume {run_dir}: not a run directory (no config.yaml); {hint}")
    if not any((run_dir / "checkpoints" / n / WEIGHTS).is_file() for n in ("latest", "best")):
        raise UserError(f"--resume {run_dir}: the run has no checkpoint to continue from (it stopped before its "
                        f"first save); start it again with `tinystories train --config {run_dir / 'config.yaml'} "
                        f"--out {run_dir}`")


def _resume_config(args, overrides: list[str]) -> RunConfig:
    """The config of a resumed run, with every check that can fail made before the tokenizer or cache is built."""
    from tinystories.data.tokenizer import load_tokenizer

    run_dir = Path(args.resume)
    if args.config:
        raise UserError(f"--config and --resume cannot be combined: a resumed run keeps its own config "
                        f"({run_dir / 'config.yaml'}); change keys with --set")
    if args.init_from:
        raise UserError(f"--init-from and --resume cannot be combined: --resume {run_dir} continues that run with its "
                        f"own weights; --init-from starts a new run from a checkpoint (give it --out NEW_RUN)")
    if args.out and Path(args.out).resolve() != run_dir.resolve():
        raise UserError(f"--out and --resume cannot be combined: a resumed run stays in {run_dir}; to start a new "
                        f"run from its weights use --init-from {run_dir} --out {args.out}")
    _check_run_dir(run_dir)
    ck = read_checkpoint(run_dir, prefer="latest")
    cfg = load_config(run_dir / "config.yaml", overrides)
    cfg.out_dir = str(run_dir)
    if args.data:
        cfg.data.source = args.data
    # the tokenizer: compared now when it exists; one still to be trained must come from unchanged settings
    # (the trainer compares it with the checkpoint's once it is there)
    tok_file = _configured_tokenizer(cfg)
    tok = load_tokenizer(tok_file) if tok_file is not None else None
    check_compatible(ck, cfg, tok, resume=True, where=run_dir, overrides=overrides, origin="its config.yaml")
    return cfg


def _init_from_config(args, overrides: list[str]) -> tuple[RunConfig, Checkpoint]:
    """A fine-tuning run's config: train.* and data.* from --config (or the defaults) and --set; the architecture
    (every model.* key but dropout) and the tokenizer from the --init-from checkpoint. A --set that contradicts
    the checkpoint is an error."""
    from pydantic import ValidationError

    from tinystories.model.checkpoint import architecture

    src = read_checkpoint(args.init_from)
    flag = f"--init-from {args.init_from}"
    arch = architecture(src.cfg.model)
    model_sets = set_items(overrides, "model")
    model_items = {item for _, _, item in model_sets}
    cfg = load_config(args.config, [item for item in overrides if item not in model_items])
    if args.config:
        ignored = [f"model.{k}={v}" for k, v in architecture(cfg.model).items()
                   if v != arch[k] and not (k == "vocab_size" and v == 0)]
        if ignored and int(os.environ.get("RANK", "0")) == 0:
            print(f"note: {flag}: the architecture and tokenizer come from the checkpoint; {args.config}'s "
                  f"{', '.join(ignored[:4])}{' ...' if len(ignored) > 4 else ''} are not used")
    raw_model = src.cfg.model.model_dump()  # dropout (not architecture) too, unless --set
    for key, text, _ in model_sets:
        value = parse_scalar(text)
        if not ((key == "vocab_size" and value == 0) or (key in ("n_kv_heads", "hidden_dim") and value is None)):
            raw_model[key] = value  # else "follow the tokenizer" / "derive it": the checkpoint's value
    raw = cfg.model_dump()
    raw["model"] = raw_model
    try:
        cfg = RunConfig.model_validate(raw)
    except ValidationError as e:
        raise UserError(format_validation_error(e, flag, overrides)) from None
    check_compatible(src, cfg, None, resume=False, where=args.init_from, overrides=overrides)
    if args.out:
        cfg.out_dir = args.out
    if args.data:
        cfg.data.source = args.data
    # the run keeps its own copy of the tokenizer: a run directory's checkpoints are replaced as it trains
    cfg.tokenizer.path = str((Path(cfg.out_dir) / "tokenizer" / tokenizer_file_name(src.tokenizer)).resolve())
    cfg.tokenizer.vocab_size = src.tokenizer.vocab_size
    cfg.model.vocab_size = src.tokenizer.vocab_size
    return cfg, src


def _cmd_train(args) -> int:
    overrides = list(args.set or [])
    mb = args.micro_batch
    if mb is not None and mb != "auto" and not (mb.isdigit() and int(mb) >= 1):
        raise UserError(f"--micro-batch {mb!r}: give a whole number of sequences >= 1, or auto")
    if args.resume:
        cfg = _resume_config(args, overrides)
    else:
        if args.init_from:
            cfg, src = _init_from_config(args, overrides)
        else:
            if not args.config:
                raise UserError("give --config FILE (e.g. configs/cpu.yaml, or auto), --resume RUN_DIR, or "
                                "--init-from CHECKPOINT (fine-tuning)")
            if args.config == "auto" and not Path("auto").exists():
                from tinystories.training.sizing import auto_config

                cfg, why = auto_config(overrides)
                print(f"model size: {why}", flush=True)
            else:
                cfg = load_config(args.config, overrides)
            if args.out:
                cfg.out_dir = args.out
            if args.data:
                cfg.data.source = args.data
        require_run_length(cfg)
        out = Path(cfg.out_dir)
        if (out / WEIGHTS).is_file():
            raise UserError(f"--out {out}: is a checkpoint directory (e.g. an imported model), not a run; choose "
                            f"another --out")
        if args.init_from:
            src_dir = resolve_checkpoint(args.init_from).resolve()
            if src_dir == out.resolve() or out.resolve() in src_dir.parents:
                raise UserError(f"--init-from {args.init_from}: lies in the run directory --out {out}, which the "
                                f"new run would replace; give the fine-tuning run another --out")
        ck = out / "checkpoints" / "latest"
        if ck.exists() and not args.force:
            raise UserError(f"{cfg.out_dir} already holds a run: continue it with --resume {cfg.out_dir}, "
                            f"choose another --out, or pass --force to start over")
        if ck.exists():
            import shutil

            shutil.rmtree(Path(cfg.out_dir) / "checkpoints")
            (Path(cfg.out_dir) / "metrics.jsonl").unlink(missing_ok=True)
        if args.init_from:  # the run keeps its own copy of the checkpoint's tokenizer, where its config names it
            Path(cfg.tokenizer.path).parent.mkdir(parents=True, exist_ok=True)
            copy_tokenizer(src.tokenizer, Path(cfg.tokenizer.path).parent)
    result = train(cfg, resume=bool(args.resume), init_from=args.init_from, micro_batch=args.micro_batch)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # a torchrun worker whose run is saved and whose process group is gone leaves without interpreter
        # finalization: gloo's threads have aborted it there (SIGABRT, "terminate called without an active
        # exception") after a finished run, about once in a hundred runs, which torchrun reports as a failure
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(result["status"])
    return result["status"]
