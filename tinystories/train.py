"""The training loop: `tinystories train`.

Packed windows of context+1 tokens are drawn at random offsets from the memory-mapped cache (no padding);
the offsets of step s, micro-step m on rank r come from a generator seeded with (seed, s, m, r), so a resumed
run draws exactly the windows the uninterrupted run would have. AdamW (decay on >= 2-dim weights only, fused
where supported), linear warmup then one cosine decay to min_lr, gradient accumulation and clipping, bf16
autocast where the hardware has it, optional torch.compile, DDP under torchrun.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from tinystories.cache import TokenCache
from tinystories.checkpoint import (
    WEIGHTS, Checkpoint, architecture_diff, load_trainer_state, load_weights, read_checkpoint, resolve_checkpoint,
    save_checkpoint,
)
from tinystories.config import RunConfig, load_config, save_config
from tinystories.errors import UserError
from tinystories.model import Transformer
from tinystories.tokenizer import TextTokenizer, copy_tokenizer, tokenizer_file_name

PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12, "4090": 165e12,
                   "5090": 209e12, "3090": 71e12, "V100": 125e12, "L40": 181e12}


# ---------------------------------------------------------------------------------------------- hardware


@dataclass
class Dist:
    rank: int = 0
    local_rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def init_distributed(device_pref: str) -> Dist:
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Dist()
    rank, local_rank, world = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    use_cuda = torch.cuda.is_available() and device_pref in ("auto", "cuda")
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return Dist(rank, local_rank, world)


def pick_device(pref: str, d: Dist) -> torch.device:
    if pref == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", d.local_rank)
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if pref.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device {pref!r}: no CUDA GPU is available here (use auto or cpu)")
    if pref == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UserError("device 'mps': Apple's Metal backend is not available here (use auto or cpu)")
    if pref == "cuda":
        return torch.device("cuda", d.local_rank)
    try:
        return torch.device(pref)
    except RuntimeError:
        raise UserError(f"device {pref!r}: not a torch device (use auto, cpu, cuda, cuda:1 or mps)") from None


def cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def pick_dtype(pref: str, device: torch.device) -> torch.dtype:
    if pref == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if device.type == "cpu" and cpu_has_bf16():
            return torch.bfloat16
        return torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[pref]


def autocast_ctx(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32 or device.type == "mps":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in PEAK_BF16_FLOPS.items():
        if key in name:
            return flops
    return None


# -------------------------------------------------------------------------------------------------- data


class WindowSampler:
    """Random windows of seq_len+1 tokens from the packed train stream, reproducible per (step, micro, rank)."""

    def __init__(self, cache: TokenCache, seq_len: int, batch: int, seed: int, rank: int, device: torch.device,
                 world: int = 1):
        split = cache.split("train")
        self.shards = [s for s in split.shards if len(s) > seq_len + 1]
        if not self.shards:
            raise UserError(f"{cache.path}: the training split has fewer than {seq_len + 2} tokens; use more text or a shorter context")
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
        shard_idx = rng.choice(len(self.shards), size=self.batch, p=self.shard_p) if len(self.shards) > 1 else np.zeros(self.batch, int)
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
    """A fixed validation subset: whole stories up to ~max_tokens tokens, and their exact UTF-8 byte count."""
    split = cache.split("val")
    if split.tokens < 2:
        split = cache.split("train")  # no held-out text at all: measure on the train split (said in the log)
    stream, docs = split.stream(), split.docs
    ends = np.append(docs[1:, 0], len(stream))
    n_docs = int(np.searchsorted(ends, max_tokens, side="left")) + 1
    n_docs = min(n_docs, len(docs))
    end = int(ends[n_docs - 1])
    if end <= 2 * max_tokens:
        return np.asarray(stream[:end]), int(docs[:n_docs, 1].sum())
    # one story longer than the budget (e.g. a validation file that is one long document): cut it and
    # count the bytes of exactly the tokens kept
    cut = np.asarray(stream[:max_tokens])
    return cut, len(tok.decode(cut[1:].tolist()).encode("utf-8"))


# ---------------------------------------------------------------------------------------------- schedule


PROVISIONAL_TOTAL = 10**9  # the run length while a time budget is still measuring the step time (warmup only)


def effective_warmup(warmup_steps: int, total_steps: int) -> int:
    """The configured warmup, or the first 10% of a run too short for it, so that every run also decays."""
    return warmup_steps if warmup_steps < total_steps else total_steps // 10


def lr_at(step: int, cfg: RunConfig, total_steps: int) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup, then one cosine decay from lr to min_lr at
    total_steps. The one schedule: the trainer sets it and `doctor` checks logged rates against it."""
    t = cfg.train
    warm = effective_warmup(t.warmup_steps, total_steps)
    if step < warm:
        return t.lr * (step + 1) / warm
    if step >= total_steps:
        return t.min_lr
    progress = (step - warm) / max(total_steps - warm, 1)
    return t.min_lr + 0.5 * (t.lr - t.min_lr) * (1 + math.cos(math.pi * progress))


def make_optimizer(model: Transformer, cfg: RunConfig, device: torch.device) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = device.type in ("cuda", "cpu")
    return torch.optim.AdamW(groups, lr=cfg.train.lr, betas=(cfg.train.beta1, cfg.train.beta2), fused=fused)


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
        self.enabled = enabled
        self.metrics = open(run_dir / "metrics.jsonl", "a") if enabled else None
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


# ------------------------------------------------------------------------------------------------- train


class NonFiniteLoss(Exception):
    pass


def _total_steps(cfg: RunConfig, tokens_per_step: int, train_tokens: int) -> int | None:
    _require_run_length(cfg)
    t = cfg.train
    if t.max_steps:
        return t.max_steps
    if t.max_tokens:
        return max(1, math.ceil(t.max_tokens / tokens_per_step))
    if t.epochs:
        return max(1, math.ceil(t.epochs * train_tokens / tokens_per_step))
    return None  # train.max_minutes: the length is measured during the first steps


def find_micro_batch(model, cfg: RunConfig, device, dtype) -> int:
    """Largest power-of-two micro-batch (up to 1024) whose forward and backward fit on the GPU."""
    if device.type != "cuda":
        return cfg.train.batch_size
    T, V = cfg.model.max_seq_len, cfg.model.vocab_size
    best, b = None, 1
    while b <= 1024:
        try:
            x = torch.randint(0, V, (b, T), device=device)
            with autocast_ctx(device, dtype):
                _, loss = model(x, x)
            loss.backward()
            model.zero_grad(set_to_none=True)
            best = b
            b *= 2
        except torch.cuda.OutOfMemoryError:
            break
        finally:
            torch.cuda.empty_cache()
    if best is None:
        raise UserError("even a micro-batch of 1 does not fit on the GPU; use a smaller model or context")
    return best


def train(cfg: RunConfig, resume: bool = False, init_from: str | None = None, micro_batch: str | None = None) -> dict:
    """Train a run. Returns a summary dict (final step, val metrics, paths)."""
    d = init_distributed(cfg.train.device)
    result = _train(cfg, d, resume, init_from, micro_batch)
    # Teardown on success only: after an error a peer may sit inside a collective, where a (collective) destroy
    # could hang; the process exits non-zero and torchrun stops the others. On success every rank first waits for
    # rank 0's final checkpoint: a rank that destroyed gloo's group while a peer was still busy once aborted at
    # exit ("terminate called without an active exception", SIGABRT) after a finished run.
    if d.enabled and dist.is_initialized():
        gc.collect()  # free the DDP wrapper (held in reference cycles) and its hold on the process group now
        dist.barrier()
        dist.destroy_process_group()
    return result


def _train(cfg: RunConfig, d: Dist, resume: bool, init_from: str | None, micro_batch: str | None) -> dict:
    from tinystories.likelihood import likelihood
    from tinystories.prepare import ensure_run_data
    from tinystories.sampling import SamplingParams, generate_texts

    run_dir = Path(cfg.out_dir)
    log = print if d.main else (lambda *a, **k: None)
    device = pick_device(cfg.train.device, d)
    dtype = pick_dtype(cfg.train.dtype, device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    # data: rank 0 builds what is missing, the others wait and then find it cached
    if d.main:
        tok, cache = ensure_run_data(cfg, log)
    if d.enabled:
        dist.barrier()
    if not d.main:
        tok, cache = ensure_run_data(cfg, lambda *a, **k: None)
    cache.check_tokenizer(tok)
    if cfg.model.vocab_size == 0:
        cfg.model.vocab_size = tok.vocab_size
    elif cfg.model.vocab_size != tok.vocab_size:
        raise UserError(f"model.vocab_size={cfg.model.vocab_size} but the tokenizer {tok.path} has {tok.vocab_size} tokens (set 0 to follow the tokenizer)")

    trainer_state, state = None, {}
    if resume:
        ck = read_checkpoint(run_dir, prefer="latest")
        if ck.tokenizer.sha256 != tok.sha256:
            raise UserError(f"--resume: the tokenizer cannot change on resume ({ck.path} was trained with "
                            f"{ck.tokenizer.path.name}, the config gives {tok.path}); start a new run, or fine-tune "
                            f"with --init-from {run_dir} --out NEW_RUN")
        diff = architecture_diff(cfg.model, ck.cfg.model)
        if diff:
            raise UserError(f"--resume: model.{diff[0]} cannot change on resume (the run has {diff[2]})")
        trainer_state, state = load_trainer_state(ck.path), ck.state

    torch.manual_seed(cfg.train.seed + d.rank)
    model = Transformer(cfg.model)
    if resume:
        load_weights(model, ck.path)
    elif init_from:
        src = read_checkpoint(init_from)
        if src.tokenizer.sha256 != tok.sha256:
            raise UserError(f"--init-from {init_from}: its tokenizer ({src.tokenizer.path}) differs from the run's "
                            f"({tok.path}); the run must tokenize its data with the checkpoint's tokenizer")
        diff = architecture_diff(cfg.model, src.cfg.model)
        if diff:
            raise UserError(f"model.{diff[0]} cannot differ from the --init-from checkpoint ({diff[2]}); the run has {diff[1]}")
        load_weights(model, src.path)
        state = {"init_from": str(src.path)}
        log(f"initialised from {src.path} (step {src.step}; architecture and tokenizer from the checkpoint)")
    model.to(device)
    n_params = model.num_params()
    log(f"model: {n_params / 1e6:.2f}M parameters ({model.num_params(non_embedding=True) / 1e6:.2f}M without embeddings), "
        f"{cfg.model.n_layers} layers, dim {cfg.model.dim}, {cfg.model.n_heads} heads ({cfg.model.kv_heads} kv), "
        f"context {cfg.model.max_seq_len}, vocab {cfg.model.vocab_size}")

    # batch geometry
    if micro_batch == "auto":
        cfg.train.batch_size = find_micro_batch(model, cfg, device, dtype)
        log(f"--micro-batch auto: {cfg.train.batch_size} sequences fit")
    elif micro_batch:
        cfg.train.batch_size = int(micro_batch)
    if cfg.train.global_batch:
        per = cfg.train.batch_size * d.world
        if cfg.train.global_batch % per and micro_batch == "auto":
            while cfg.train.batch_size > 1 and cfg.train.global_batch % (cfg.train.batch_size * d.world):
                cfg.train.batch_size //= 2
            per = cfg.train.batch_size * d.world
        if cfg.train.global_batch % per:
            raise UserError(f"train.global_batch={cfg.train.global_batch} is not a multiple of micro-batch x processes = {per}")
        cfg.train.grad_accum = cfg.train.global_batch // per
    T = cfg.model.max_seq_len
    global_batch = cfg.train.batch_size * cfg.train.grad_accum * d.world
    tokens_per_step = global_batch * T
    train_tokens = cache.manifest["splits"]["train"]["tokens"]
    log(f"batch: {cfg.train.batch_size} x {cfg.train.grad_accum} accumulation x {d.world} process(es) = {global_batch} "
        f"sequences = {tokens_per_step:,} tokens per step; device {device}, {str(dtype).removeprefix('torch.')}"
        f"{', compiled' if cfg.train.compile else ''}")

    optimizer = make_optimizer(model, cfg, device)
    raw_model = model
    if cfg.train.compile:
        model = torch.compile(model)
    from torch.nn.parallel import DistributedDataParallel as DDP

    if d.enabled:
        model = DDP(model, device_ids=[d.local_rank] if device.type == "cuda" else None)

    start_step = 0
    total_steps = _total_steps(cfg, tokens_per_step, train_tokens)
    best_val, bad_evals = float("inf"), 0
    if trainer_state is not None:
        optimizer.load_state_dict(trainer_state["optimizer"])
        torch.set_rng_state(trainer_state["cpu_rng"])
        if device.type == "cuda" and "cuda_rng" in trainer_state:
            torch.cuda.set_rng_state(trainer_state["cuda_rng"])
        start_step = state["step"]
        if state.get("total_steps") and not (cfg.train.max_steps or cfg.train.max_tokens or cfg.train.epochs) or \
                (total_steps is None and state.get("total_steps")):
            total_steps = state["total_steps"]
        best_val = state.get("best_val_loss", float("inf"))
        bad_evals = state.get("evals_without_improvement", 0)
        log(f"resumed from {ck.path} at step {start_step}")

    if d.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    sampler = WindowSampler(cache, T, cfg.train.batch_size, cfg.train.seed, d.rank, device, d.world)
    val_stream, val_bytes = validation_subset(cache, tok, cfg.train.eval_tokens)
    amp = autocast_ctx(device, dtype)
    peak = peak_flops(device)
    flops_per_token = raw_model.flops_per_token()
    deadline = time.time() + cfg.train.max_minutes * 60 if cfg.train.max_minutes and total_steps is None else None
    if deadline and state.get("deadline_left_s"):
        deadline = time.time() + state["deadline_left_s"]

    def from_rank0(value: float) -> float:  # DDP: rank 0's value, so that every rank runs the same number of steps
        if not d.enabled:
            return value
        t = torch.tensor([float(value)], dtype=torch.float64, device=device)
        dist.broadcast(t, 0)
        return float(t)

    if deadline and d.enabled:
        deadline = from_rank0(deadline)
    provisional = total_steps is None
    if provisional:
        total_steps = max(start_step + 1, PROVISIONAL_TOTAL)
    reporter = Reporter(run_dir, cfg, d.main, total_steps if not provisional else 0, start_step)

    def evaluate() -> dict:
        ws = d.world if d.enabled else 1
        res = likelihood(raw_model, val_stream, val_bytes, T, batch_size=max(1, cfg.train.batch_size), autocast=amp,
                         rank=d.rank, world=ws)
        if d.enabled:
            t = torch.tensor([res["nats"], res["tokens"]], dtype=torch.float64, device=device)
            dist.all_reduce(t)
            res = {"nats": float(t[0]), "tokens": int(t[1]), "bytes": val_bytes}
        loss = res["nats"] / max(res["tokens"], 1)
        return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50)), "val_bpb": res["nats"] / math.log(2) / val_bytes}

    def sample_story() -> str:
        params = SamplingParams(max_new_tokens=cfg.train.sample_tokens, temperature=0.8, top_k=50, top_p=0.95, seed=1234)
        raw_model.eval()
        text = generate_texts(raw_model, tok, cfg.train.sample_prompt, params)[0]["text"]
        raw_model.train()
        return text.replace("\n", " ")

    def checkpoint(step: int, metrics: dict, is_best: bool) -> None:
        if not d.main:
            return
        st = {
            "step": step, "tokens": step * tokens_per_step, "epoch": step * tokens_per_step / train_tokens,
            "total_steps": None if provisional else total_steps, "cache_dir": str(cache.path.resolve()),
            "metrics": metrics, "best_val_loss": best_val, "evals_without_improvement": bad_evals,
            "global_batch": global_batch, "world_size": d.world, "n_params": n_params,
            "deadline_left_s": (deadline - time.time()) if deadline else None,
        }
        if state.get("init_from"):
            st["init_from"] = state["init_from"]  # the checkpoint this run was fine-tuned from
        ts = {"optimizer": optimizer.state_dict(), "cpu_rng": torch.get_rng_state()}
        if device.type == "cuda":
            ts["cuda_rng"] = torch.cuda.get_rng_state()
        save_checkpoint(run_dir, raw_model, cfg, tok, st, ts, is_best)

    def forward_backward(m, x, y, sync: bool) -> torch.Tensor:
        ctx = m.no_sync() if d.enabled and not sync else contextlib.nullcontext()
        with ctx:
            with amp:
                _, loss = m(x, y)
            (loss / cfg.train.grad_accum).backward()
        return loss

    model.train()
    step = start_step
    last_metrics: dict = state.get("metrics", {})
    running = torch.zeros((), device=device)
    running_n = 0
    bad_step = torch.full((), -1, dtype=torch.long, device=device)
    t_log, step_log = time.time(), step
    t_start = time.time()
    measured_steps, measured_time = 0, 0.0
    train_loss_avg = float("nan")
    stop_reason = "completed"
    status = 0
    try:
        while step < total_steps:
            # evaluation (also at the first step of a fresh run: a baseline for the plot)
            if step % cfg.train.eval_interval == 0 and not (resume and step == start_step):
                t_eval = time.time()
                ev = evaluate()
                improved = ev["val_loss"] < best_val
                if improved:
                    best_val, bad_evals = ev["val_loss"], 0
                else:
                    bad_evals += 1
                last_metrics = {**ev, "train_loss": train_loss_avg}
                point = {"kind": "val", "step": step, "tokens": step * tokens_per_step,
                         "epoch": step * tokens_per_step / train_tokens, **ev, "train_loss": train_loss_avg,
                         "lr": lr_at(step, cfg, total_steps), "time": time.time() - t_start}
                reporter.log(point, None, total_steps)
                reporter.print(f"eval step {step}: val loss {ev['val_loss']:.4f} | ppl {ev['val_ppl']:.2f} | "
                               f"bpb {ev['val_bpb']:.4f}{' (best)' if improved else ''}")
                if d.main:
                    reporter.print(f"  sample: {sample_story()}")
                if (step > start_step or init_from) and d.main:  # fine-tuning: the starting model can stay the best
                    checkpoint(step, last_metrics, improved)
                if cfg.train.early_stopping_patience and bad_evals >= cfg.train.early_stopping_patience:
                    stop_reason = f"early stop: no val improvement in {bad_evals} evaluations"
                    break
                t_log += time.time() - t_eval  # tokens/s measures training; the budget still counts evaluation

            lr = lr_at(step, cfg, total_steps)
            lr_total = None if provisional else total_steps  # the run length this lr was scheduled for (logged)
            for g in optimizer.param_groups:
                g["lr"] = lr
            t_step = time.time()
            for micro in range(cfg.train.grad_accum):
                x, y = sampler.get(step, micro)
                sync = micro == cfg.train.grad_accum - 1
                try:
                    loss = forward_backward(model, x, y, sync)
                except Exception as e:  # torch.compile fails on the first call (e.g. no C++ compiler): go eager
                    if not (cfg.train.compile and step == start_step and micro == 0):
                        raise
                    log(f"warning: torch.compile failed ({str(e).strip().splitlines()[0][:120]}); training without it")
                    model = DDP(raw_model, device_ids=[d.local_rank] if device.type == "cuda" else None) if d.enabled else raw_model
                    optimizer.zero_grad(set_to_none=True)
                    loss = forward_backward(model, x, y, sync)
                running += loss.detach()
                running_n += 1
            finite = torch.isfinite(running)
            bad_step = torch.where((~finite) & (bad_step < 0), torch.tensor(step, device=device), bad_step)
            if cfg.train.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if step - start_step > 2:  # the first steps include warm-up (allocation, compilation)
                measured_steps += 1
                measured_time += time.time() - t_step

            # a time budget fixes the schedule's length once 10 steps have measured the step time (early, so that a
            # budget shorter than the configured warmup still gets a short warmup and a full decay)
            now_s = from_rank0(time.time()) if deadline else time.time()  # time-budget decisions: rank 0's clock
            if provisional and (step >= start_step + 10 or now_s > deadline):
                per_step = (measured_time / measured_steps if measured_steps
                            else (time.time() - t_start) / max(step - start_step, 1))
                total_steps = max(step + 1, step + int((deadline - now_s) / (per_step * 1.08)))
                total_steps = int(from_rank0(total_steps))
                provisional = False
                log(f"time budget: {cfg.train.max_minutes:g} min -> {total_steps} steps "
                    f"({per_step * 1000:.0f} ms/step, evaluation included)")

            last = step >= total_steps
            if step % cfg.train.log_interval == 0 or last:
                if d.enabled:  # the logged loss is the mean over every rank's micro-batches, not rank 0's share
                    dist.all_reduce(running)
                    running /= d.world
                    dist.all_reduce(bad_step, op=dist.ReduceOp.MAX)
                mean_loss = float(running) / max(running_n, 1)  # the one host sync, at log intervals
                if int(bad_step) >= 0:
                    raise NonFiniteLoss(int(bad_step))
                running.zero_()
                running_n = 0
                train_loss_avg = mean_loss
                now = time.time()
                tps = (step - step_log) * tokens_per_step / max(now - t_log, 1e-9)
                t_log, step_log = now, step
                mfu = (tps * flops_per_token / d.world / peak) if peak else None
                eta = (total_steps - step) * tokens_per_step / max(tps, 1e-9)
                point = {"kind": "train", "step": step, "tokens": step * tokens_per_step,
                         "epoch": step * tokens_per_step / train_tokens, "loss": mean_loss, "lr": lr,
                         "total_steps": lr_total, "tokens_per_s": tps, "time": now - t_start}
                if mfu is not None:
                    point["mfu"] = mfu
                line = (f"step {step}/{total_steps if not provisional else '?'} | epoch {point['epoch']:.2f} | "
                        f"tokens {fmt_count(point['tokens'])} | loss {mean_loss:.4f} | lr {lr:.2e} | "
                        f"{fmt_count(tps)} tok/s" + (f" | MFU {mfu:.1%}" if mfu is not None else "") +
                        f" | eta {fmt_secs(deadline - now) if provisional and deadline else fmt_secs(eta)}")
                reporter.log(point, line, total_steps)
            if step % cfg.train.checkpoint_interval == 0 and step % cfg.train.eval_interval and not last:
                checkpoint(step, last_metrics, False)
            if deadline and now_s > deadline + 5 and not last:
                total_steps = step  # over budget (a slow machine): finish now
        # final evaluation and checkpoint
        ev = evaluate()
        improved = ev["val_loss"] < best_val
        if improved:
            best_val, bad_evals = ev["val_loss"], 0
        last_metrics = {**ev, "train_loss": train_loss_avg}
        reporter.log({"kind": "val", "step": step, "tokens": step * tokens_per_step,
                      "epoch": step * tokens_per_step / train_tokens, **ev, "train_loss": train_loss_avg,
                      "lr": lr_at(step, cfg, total_steps), "time": time.time() - t_start}, None, total_steps)
        reporter.print(f"final eval step {step}: val loss {ev['val_loss']:.4f} | ppl {ev['val_ppl']:.2f} | bpb {ev['val_bpb']:.4f}")
        checkpoint(step, last_metrics, improved)
    except NonFiniteLoss as e:
        reporter.close()
        raise UserError(f"the loss became NaN/inf at step {e.args[0]}; the last good checkpoint is kept in "
                        f"{run_dir / 'checkpoints' / 'latest'}. Lower train.lr or raise warmup_steps, then "
                        f"`tinystories train --resume {run_dir}`") from None
    except KeyboardInterrupt:
        stop_reason = "interrupted"
        status = 130
        if step > start_step and d.main:
            reporter.print(f"interrupted at step {step}: saving a checkpoint ...")
            checkpoint(step, last_metrics, False)
    except torch.cuda.OutOfMemoryError:
        reporter.close()
        raise UserError(f"GPU out of memory with a micro-batch of {cfg.train.batch_size}: use a smaller "
                        f"--set train.batch_size with a larger train.grad_accum (same global batch), or --micro-batch auto") from None
    finally:
        reporter.close()
    if d.main:
        if stop_reason == "interrupted":
            print(f"stopped at step {step}. continue with: tinystories train --resume {run_dir}")
        else:
            print(f"done: {stop_reason} at step {step} in {fmt_secs(time.time() - t_start)}; "
                  f"best val loss {best_val:.4f}; checkpoints in {run_dir / 'checkpoints'}")
    return {"step": step, "status": status, "run_dir": str(run_dir), "metrics": last_metrics, "best_val_loss": best_val}


# --------------------------------------------------------------------------------------------------- CLI


def _set_items(overrides: list[str], section: str) -> list[tuple[str, str, str]]:
    """(key, value text, the --set item) of each --set in `section` (e.g. "model"), in order."""
    out = []
    for item in overrides:
        if "=" not in item:
            continue  # load_config reports it
        key, value = item.split("=", 1)
        parts = [p.strip() for p in key.strip().split(".")]
        if parts[0] == section and len(parts) == 2:
            out.append((parts[1], value, item))
    return out


def _require_run_length(cfg: RunConfig) -> None:
    t = cfg.train
    if not (t.max_steps or t.max_tokens or t.epochs or t.max_minutes):
        raise UserError("set the run length: --set train.max_steps=N (or train.max_tokens, train.epochs, "
                        "train.max_minutes)")


def _configured_tokenizer(cfg: RunConfig) -> Path | None:
    """The tokenizer file a run's config names (tokenizer.path, else data_dir/tokenizer-VOCAB), or None when it
    does not exist yet (it would be trained)."""
    from tinystories.prepare import DEFAULT_TOKENIZER_DIR
    from tinystories.tokenizer import find_tokenizer_file

    if cfg.tokenizer.path:
        return find_tokenizer_file(cfg.tokenizer.path)  # a missing path is an error
    f = Path(cfg.data.data_dir) / f"{DEFAULT_TOKENIZER_DIR}-{cfg.tokenizer.vocab_size}" / "tokenizer.json"
    return f if f.is_file() else None


def _resume_config(args, overrides: list[str]) -> RunConfig:
    """The config of a resumed run, with every check that can fail made before the tokenizer or cache is built."""
    from tinystories.tokenizer import load_tokenizer

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
    ck = read_checkpoint(run_dir, prefer="latest")
    cfg = load_config(run_dir / "config.yaml", overrides)
    cfg.out_dir = str(run_dir)
    if args.data:
        cfg.data.source = args.data
    diff = architecture_diff(cfg.model, ck.cfg.model)
    if diff:
        key, new, old = diff
        item = next((item for k, _, item in reversed(_set_items(overrides, "model")) if k == key), None)
        asked = f"; --set {item} asks for {new}" if item else f"; its config.yaml now has {new}"
        raise UserError(f"--resume: model.{key} cannot change on resume (the run has {old}){asked}: the "
                        f"weights have the run's shape; another architecture is a new run (--config ... --out NEW_RUN)")
    # the tokenizer: compared now when it exists; one still to be trained must come from unchanged settings
    # (the trainer compares it with the checkpoint's once it is there)
    tok_file = _configured_tokenizer(cfg)
    old_tok = ck.tokenizer
    if tok_file is not None:
        changed = load_tokenizer(tok_file).sha256 != old_tok.sha256
        what = str(tok_file)
    else:
        changed = (cfg.tokenizer.model_dump() != ck.cfg.tokenizer.model_dump()
                   or cfg.data.data_dir != ck.cfg.data.data_dir)
        what = f"a new {cfg.tokenizer.vocab_size}-token tokenizer"
    if changed:
        sets = [item for item in overrides if item.split("=", 1)[0].strip().startswith(("tokenizer.", "data.data_dir"))]
        via = f" ({' '.join('--set ' + i for i in sets)})" if sets else ""
        raise UserError(f"--resume: the tokenizer cannot change on resume: the run was trained with "
                        f"{old_tok.kind} {old_tok.vocab_size}-token {old_tok.path.name}, the config now gives "
                        f"{what}{via}; start a new run, or fine-tune with --init-from {run_dir} --out NEW_RUN")
    return cfg


def _init_from_config(args, overrides: list[str]) -> tuple[RunConfig, Checkpoint]:
    """A fine-tuning run's config: train.* and data.* from --config (or the defaults) and --set; the architecture
    (every model.* key but dropout) and the tokenizer from the --init-from checkpoint. A --set that contradicts
    the checkpoint is an error."""
    from pydantic import ValidationError

    from tinystories.checkpoint import architecture
    from tinystories.config import _format_validation_error, _parse_scalar
    from tinystories.tokenizer import load_tokenizer

    src = read_checkpoint(args.init_from)
    flag = f"--init-from {args.init_from}"
    arch = architecture(src.cfg.model)
    model_sets = _set_items(overrides, "model")
    for key, text, item in model_sets:
        if key not in arch:
            continue  # dropout; an unknown key is reported by the validation below
        value = _parse_scalar(text)
        if (key == "vocab_size" and value == 0) or (key in ("n_kv_heads", "hidden_dim") and value is None):
            continue  # "follow the tokenizer" / "derive it": the checkpoint's value
        if value != arch[key]:
            raise UserError(f"--set {item}: model.{key} cannot differ from the --init-from checkpoint "
                            f"({arch[key]}); the architecture comes from {src.path} (leave model.{key} out)")
    model_items = {item for _, _, item in model_sets}
    other = [item for item in overrides if item not in model_items]
    cfg = load_config(args.config, other)
    for key, text, item in _set_items(overrides, "tokenizer"):
        if key == "path":
            same = load_tokenizer(_parse_scalar(text)).sha256 == src.tokenizer.sha256
        elif key == "vocab_size":
            same = _parse_scalar(text) == src.tokenizer.vocab_size
        else:
            continue  # tokenizer.max_stories: only for training a tokenizer, which a fine-tune does not do
        if not same:
            raise UserError(f"--set {item}: the tokenizer cannot differ from the --init-from checkpoint's "
                            f"({src.tokenizer.kind} {src.tokenizer.vocab_size}-token {src.tokenizer.path.name}, "
                            f"which its weights were trained with); leave tokenizer.{key} out")
    if args.config:
        ignored = [f"model.{k}={v}" for k, v in architecture(cfg.model).items()
                   if v != arch[k] and not (k == "vocab_size" and v == 0)]
        if ignored and int(os.environ.get("RANK", "0")) == 0:
            print(f"note: {flag}: the architecture and tokenizer come from the checkpoint; {args.config}'s "
                  f"{', '.join(ignored[:4])}{' ...' if len(ignored) > 4 else ''} are not used")
    raw_model = src.cfg.model.model_dump()  # dropout (not architecture) too, unless --set
    for key, text, _ in model_sets:
        raw_model[key] = _parse_scalar(text)
    raw = cfg.model_dump()
    raw["model"] = raw_model
    try:
        cfg = RunConfig.model_validate(raw)
    except ValidationError as e:
        raise UserError(_format_validation_error(e, flag, overrides)) from None
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
                raise UserError("give --config FILE (e.g. configs/cpu.yaml), --resume RUN_DIR, or --init-from "
                                "CHECKPOINT (fine-tuning)")
            cfg = load_config(args.config, overrides)
            if args.out:
                cfg.out_dir = args.out
            if args.data:
                cfg.data.source = args.data
        _require_run_length(cfg)
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


def register_cli(sub) -> None:
    from tinystories.cli import add_command

    p = add_command(sub, "train", "train a Llama-style model on the token cache (CPU, GPU, or several under torchrun)",
                    "  tinystories train --config configs/cpu.yaml --data ../shared/data/tinystories --out runs/cpu\n"
                    "  tinystories train --config configs/tinystories-23M.yaml --set train.lr=3e-4 --set train.compile=true\n"
                    "  tinystories train --resume runs/cpu                      # continue exactly where it stopped\n"
                    "  tinystories train --resume runs/cpu --set train.max_steps=6000   # ... and train longer\n"
                    "  tinystories train --init-from runs/stories260K --data ../shared/data/tinystories --out runs/ft \\\n"
                    "      --set train.max_steps=200    # fine-tune: architecture and tokenizer from the checkpoint\n"
                    "  torchrun --nproc_per_node=8 -m tinystories train --config configs/tinystories-23M.yaml\n",
                    _cmd_train)
    p.add_argument("--config", help="run config (YAML), e.g. configs/cpu.yaml (optional with --init-from: train.* "
                                    "and data.* only; not with --resume)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key, e.g. train.lr=3e-4 (repeatable)")
    p.add_argument("--out", help="run directory (overrides out_dir)")
    p.add_argument("--data", help="raw text file or directory (overrides data.source)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its latest checkpoint")
    p.add_argument("--init-from", metavar="CHECKPOINT",
                   help="fine-tune: a new run starting from these weights (a checkpoint or run directory) with a fresh "
                        "optimizer; its architecture (model.*) and tokenizer come from the checkpoint")
    p.add_argument("--micro-batch", metavar="N|auto", help="micro-batch per process; auto finds the largest that fits (GPU)")
    p.add_argument("--force", action="store_true", help="overwrite an existing run in --out")
