"""What feeds the training steps: the run's data, its batch geometry, the train windows and the validation subset.

Packed windows of context+1 tokens are read from the memory-mapped cache (no padding), in one of two orders
(train.windows): `random`, offsets drawn from a generator seeded with (seed, step, micro-step, rank); or
`epochs`, every pass over the stream cut into windows seq_len apart (each shares one token with the next) from a
random phase and read in a random order, both seeded with (seed, pass), so that each target is predicted once per
pass. Either way a resumed run draws exactly the
windows the uninterrupted run would have. The batch geometry (micro-batch x accumulation x processes)
is fixed once by set_batch_geometry; `Batch` then says how many sequences and tokens each optimizer step trains.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from tinystories.core.config import RunConfig
from tinystories.core.errors import UserError
from tinystories.data.cache import TokenCache
from tinystories.data.requests import RequestTokens
from tinystories.data.tokenizer import TextTokenizer
from tinystories.model.device import Dist


def load_run_data(cfg: RunConfig, d: Dist, log: Callable[..., None]) -> tuple[TextTokenizer, TokenCache]:
    """The run's tokenizer and token cache: rank 0 builds what is missing, the others wait and then find it cached.
    Fills model.vocab_size from the tokenizer (0 = follow it)."""
    from tinystories.data.prepare import ensure_run_data

    if d.main:
        tok, cache = ensure_run_data(cfg, log)
    if d.enabled:
        dist.barrier()
    if not d.main:
        tok, cache = ensure_run_data(cfg, log)
    cache.check_tokenizer(tok)
    if cfg.model.vocab_size == 0:
        cfg.model.vocab_size = tok.vocab_size
    elif cfg.model.vocab_size != tok.vocab_size:
        raise UserError(f"model.vocab_size={cfg.model.vocab_size} but the tokenizer {tok.path} has {tok.vocab_size} "
                        f"tokens (set 0 to follow the tokenizer)")
    return tok, cache


# ------------------------------------------------------------------------------------------- batch geometry


@dataclass(frozen=True)
class Batch:
    """One optimizer step's batch: `micro` sequences x `accum` micro-steps x `world` processes, `seq_len` tokens
    each."""

    micro: int
    accum: int
    world: int
    seq_len: int

    @property
    def sequences(self) -> int:
        """The global batch: sequences per optimizer step over every process."""
        return self.micro * self.accum * self.world

    @property
    def tokens(self) -> int:
        """Tokens per optimizer step over every process."""
        return self.sequences * self.seq_len

    def describe(self) -> str:
        return (f"{self.micro} x {self.accum} accumulation x {self.world} process(es) = {self.sequences} sequences = "
                f"{self.tokens:,} tokens per step")


def find_micro_batch(cfg: RunConfig, d: Dist, device: torch.device, dtype: torch.dtype, per_process: int) -> int:
    """The largest micro-batch whose estimated peak memory (memory.py) fits on this GPU and divides the
    `per_process` sequences each process trains per step, so that accumulation keeps the global batch; the
    configured one elsewhere."""
    from tinystories.training.memory import cuda_budget, pick_micro_batch

    t = cfg.train
    if device.type != "cuda":
        return t.batch_size
    b, _ = pick_micro_batch(cfg.model, per_process, cuda_budget(device), dtype, optimizer=t.optimizer,
                            ddp=d.enabled)
    return b


def set_batch_geometry(cfg: RunConfig, d: Dist, device: torch.device, dtype: torch.dtype, micro_batch: str | None,
                       log: Callable[..., None]) -> Batch:
    """train.batch_size (the micro-batch: --micro-batch N, or auto: the largest that fits) and train.grad_accum
    (from train.global_batch when it is set); returns the batch they make."""
    t = cfg.train
    if micro_batch is None and device.type == "cuda":
        micro_batch = "auto"  # on a GPU the micro-batch follows its memory; the global batch stays the config's
    if micro_batch == "auto" and device.type == "cuda":
        wanted = t.global_batch or t.batch_size * t.grad_accum * d.world  # the config's global batch
        t.batch_size = find_micro_batch(cfg, d, device, dtype, wanted // d.world)
        if not t.global_batch:
            t.global_batch = wanted
        log(f"--micro-batch auto: {t.batch_size} sequences fit (memory estimate), accumulation keeps "
            f"{wanted} sequences per step")
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
    return Batch(t.batch_size, t.grad_accum, d.world, cfg.model.max_seq_len)


# ------------------------------------------------------------------------------------------------ windows


class WindowSampler:
    """Windows of seq_len+1 tokens from the packed train stream in the train.windows order, reproducible per
    (step, micro, rank)."""

    def __init__(self, cache: TokenCache, seq_len: int, batch: int, seed: int, rank: int, device: torch.device,
                 world: int = 1, unscored: RequestTokens | None = None, word_weight: float = 1.0,
                 order: str = "random", accum: int = 1):
        """`unscored(ids)`: which tokens of a stretch of the stream get no loss (their targets become -1, the
        loss's ignore_index); data/requests.RequestTokens for train.loss_on=story. `word_weight` (with `unscored`,
        train.request_word_weight): the loss weight of the targets where a story first writes a requested word
        (RequestTokens.requested_words); 1: every scored target weighs the same and get() returns no weights.
        `order` (train.windows): "random" or "epochs" (module docstring); `accum`: micro-steps per optimizer step,
        which "epochs" needs to number the sequences of a step."""
        self.unscored = unscored
        self.word_weight = word_weight if unscored is not None and word_weight != 1.0 else None
        split = cache.split("train")
        self.shards = [s for s in split.shards if len(s) > seq_len + 1]
        if not self.shards:
            raise UserError(f"{cache.path}: the training split has fewer than {seq_len + 2} tokens; use more text or "
                            f"a shorter context")
        sizes = np.array([len(s) - seq_len - 1 for s in self.shards], dtype=np.float64)
        self.shard_p = sizes / sizes.sum()
        self.seq_len, self.batch, self.seed, self.rank, self.device = seq_len, batch, seed, rank, device
        self.world, self.accum, self.order = world, accum, order
        self.pin = device.type == "cuda"
        self._pass: tuple[int, np.ndarray, np.ndarray] | None = None  # (pass, shard of each window, its offset)

    def get(self, step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(inputs, targets, loss weights per target or None) of micro-batch `micro` of optimizer step `step`."""
        rows, masks, words = [], [], []
        for si, o in self._windows(step, micro):
            shard = self.shards[si]
            rows.append(shard[o : o + self.seq_len + 1])
            if self.unscored is not None:  # judged with tokens around the window, which may start mid-request
                lo, end = max(0, o - self.unscored.LOOKBACK), o + self.seq_len + 1
                stretch = shard[lo : end + self.unscored.lookahead]
                request = self.unscored(stretch)
                masks.append(request[o - lo + 1 : end - lo])
                if self.word_weight is not None:
                    words.append(self.unscored.requested_words(stretch, request)[o - lo + 1 : end - lo])
        buf = np.stack(rows).astype(np.int64)
        inputs, targets = buf[:, :-1], buf[:, 1:]
        if masks:
            targets = np.where(np.stack(masks), -1, targets)
        pair = torch.from_numpy(np.stack([inputs, targets]))
        if self.pin:
            pair = pair.pin_memory()
        pair = pair.to(self.device, non_blocking=True)
        weights = None
        if words:
            weights = torch.from_numpy(np.where(np.stack(words), self.word_weight, 1.0).astype(np.float32))
            weights = weights.to(self.device, non_blocking=True)
        return pair[0], pair[1], weights

    def _windows(self, step: int, micro: int) -> list[tuple[int, int]]:
        """(shard, offset) of each window of micro-batch `micro` of optimizer step `step`."""
        # rank r's micro-step m under DDP reads the windows of micro-step m * world + r of a single process with
        # world x the accumulation (the same data): "random" seeds with that global micro-batch index, "epochs"
        # numbers the sequences in that order
        if self.order == "epochs":
            first = (step * self.accum * self.world + micro * self.world + self.rank) * self.batch
            return [self._epoch_window(g) for g in range(first, first + self.batch)]
        rng = np.random.default_rng((self.seed, step, micro * self.world + self.rank, 0))
        shard_idx = (rng.choice(len(self.shards), size=self.batch, p=self.shard_p) if len(self.shards) > 1
                     else np.zeros(self.batch, int))
        return [(int(si), int(rng.integers(0, len(self.shards[si]) - self.seq_len - 1))) for si in shard_idx]

    def _epoch_window(self, g: int) -> tuple[int, int]:
        """The window of sequence number `g` in the "epochs" order: its pass's windows, shuffled."""
        if self._pass is None or g // self._pass[1].size != self._pass[0]:
            p = g // self.windows_per_pass
            self._pass = (p, *self._windows_in_pass(p))
        p, shard_of, offset = self._pass
        k = g - p * shard_of.size
        return int(shard_of[k]), int(offset[k])

    @property
    def windows_per_pass(self) -> int:
        """Windows of each pass in the "epochs" order: as many as fit in every shard from any phase."""
        return sum(self._fits(len(s)) for s in self.shards)

    def _fits(self, n_tokens: int) -> int:
        # windows of seq_len+1 tokens, seq_len apart (each target once per pass), from a phase below seq_len
        return max((n_tokens - self.seq_len) // self.seq_len, 1)

    def _windows_in_pass(self, p: int) -> tuple[np.ndarray, np.ndarray]:
        """Pass `p`'s windows in reading order: each shard cut into windows from one random phase (the window
        edges move between passes), all of them shuffled."""
        rng = np.random.default_rng((self.seed, p, 1))
        phase = int(rng.integers(0, self.seq_len))
        shard_of, offset = [], []
        for i, shard in enumerate(self.shards):
            n = self._fits(len(shard))
            offset.append(min(phase, len(shard) - n * self.seq_len - 1) + self.seq_len * np.arange(n))
            shard_of.append(np.full(n, i, dtype=np.int32))
        order = rng.permutation(sum(len(o) for o in offset))
        return np.concatenate(shard_of)[order], np.concatenate(offset)[order]


def validation_subset(cache: TokenCache, tok: TextTokenizer, max_tokens: int) -> tuple[np.ndarray, int]:
    """The fixed validation subset (train.eval_tokens): the first max_tokens predicted tokens of the validation
    split and their exact UTF-8 byte count, cut by likelihood.cut_split, as `eval --max-tokens` cuts it."""
    from tinystories.model.likelihood import cut_split

    split = cache.split("val")
    if split.tokens < 2:
        split = cache.split("train")  # no held-out text at all: measure on the train split (said in the log)
    return cut_split(split, tok, max_tokens)
