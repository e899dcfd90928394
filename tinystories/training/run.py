"""Run: everything a training run trains with, built once by setup() (loop.py), and what it saves besides the
weights and state.json: trainer.pt, the optimizer's state, the loss scaler's and every rank's RNG states."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from tinystories.core.config import RunConfig
from tinystories.data.cache import TokenCache
from tinystories.data.tokenizer import TextTokenizer
from tinystories.model.device import DevicePolicy, Dist
from tinystories.model.transformer import Transformer
from tinystories.training.batches import Batch, WindowSampler
from tinystories.training.meters import ScalerSkips


def wrap_model(model: Transformer, d: Dist, device: torch.device, compile: bool) -> torch.nn.Module:
    """The model the training steps run: compiled (torch.compile) and/or wrapped in DDP under torchrun.

    On a CPU, compiled dropout draws its masks with ATen's random kernels (Inductor's `fallback_random`) instead of
    Inductor's own per-element generator: dropout 0.1 then costs ~13% of a training step instead of ~18%
    (docs/training-recipe.md). On CUDA Inductor's generator is the fast one, so it stays."""
    if compile:
        model = torch.compile(model, options={"fallback_random": True} if device.type == "cpu" else None)
    if d.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(model, device_ids=[d.local_rank] if device.type == "cuda" else None)
    return model


@dataclass
class Run:
    """Everything a run trains with, built once by setup()."""

    cfg: RunConfig
    d: Dist
    log: Callable[..., None]  # print on rank 0; silent on the other ranks
    # the device and its numerics
    device: torch.device
    policy: DevicePolicy  # dtype, TF32, attention kernel, compile
    amp: contextlib.AbstractContextManager  # the autocast the forward passes run under
    scaler: torch.amp.GradScaler  # float16: loss scaling; otherwise a pass-through
    skips: ScalerSkips  # float16: the updates the scaler skipped, counted on the device
    peak: float | None  # the device's peak FLOP/s, for MFU (None: not known)
    # the data
    tok: TextTokenizer
    cache: TokenCache
    batch: Batch  # sequences and tokens per optimizer step
    sampler: WindowSampler
    val_stream: np.ndarray  # the fixed validation subset and its UTF-8 byte count
    val_bytes: int
    # the model
    raw_model: Transformer  # the model itself: evaluated, sampled, saved
    model: torch.nn.Module  # what the steps run: raw_model compiled and/or wrapped in DDP
    optimizer: torch.optim.Optimizer
    n_params: int
    flops_per_token: float

    @property
    def dir(self) -> Path:
        return Path(self.cfg.out_dir)

    @property
    def train_tokens(self) -> int:
        return self.cache.manifest["splits"]["train"]["tokens"]

    def from_rank0(self, value: float) -> float:
        """DDP: rank 0's value on every rank (so that every rank runs the same number of steps)."""
        if not self.d.enabled:
            return value
        t = torch.tensor([float(value)], dtype=torch.float64, device=self.device)
        dist.broadcast(t, 0)
        return float(t)

    def position(self, step: int) -> dict:
        tokens = step * self.batch.tokens
        return {"tokens": tokens, "epoch": tokens / self.train_tokens}

    def facts(self, step: int) -> dict:
        """What a checkpoint's state.json says about the run beside its TrainState."""
        return {**self.position(step), "cache_dir": str(self.cache.path.resolve()),
                "global_batch": self.batch.sequences, "world_size": self.d.world, "n_params": self.n_params}

    def fall_back_to_eager(self, error: Exception) -> None:
        """torch.compile failed on the first call (e.g. no C++ compiler): train the model uncompiled."""
        self.log(f"warning: torch.compile failed ({str(error).strip().splitlines()[0][:120]}); training without it")
        self.model = wrap_model(self.raw_model, self.d, self.device, compile=False)
        self.optimizer.zero_grad(set_to_none=True)

    # ------------------------------------------------------------------------------------------ trainer.pt

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
