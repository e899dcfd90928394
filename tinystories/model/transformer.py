"""A Llama-2 style decoder: RMSNorm, rotary embeddings, SwiGLU, grouped-query attention through SDPA.

Rotary embeddings rotate interleaved pairs (dims 2i, 2i+1), the layout of Meta's Llama and llama2.c, so
llama2.c checkpoints load without permutation; the Hugging Face export permutes q/k to HF's half layout.

`forward(tokens, targets)` trains; `forward(tokens, cache=KVCache)` decodes incrementally and returns the same
logits as the full forward pass (tests/test_model.py proves it). `decode(tokens, cache)` is what sampling calls:
the same forward, through torch.compile for one-token steps once `compile_decoding()` was called.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tinystories.core.config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x.float(), (x.size(-1),), self.weight.float(), self.eps).type_as(x)


def rope_table(head_dim: int, max_len: int, theta: float) -> torch.Tensor:
    """Rotations e^(i * pos * freq) as complex64, shape (max_len, head_dim / 2)."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(max_len, dtype=torch.float32), freqs)
    return torch.polar(torch.ones_like(angles), angles)


def apply_rope(x: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    """x: (B, H, T, hd) with interleaved pairs (2i, 2i+1); rot: (T, hd/2) complex, or (T, hd/2, 2) cos/sin.

    In eager mode one complex multiply is ~4x faster on CPU (forward + backward) than the rotation in real
    ops; torch.compile cannot generate code for complex numbers, so compiled models get the real form,
    which inductor fuses into one kernel."""
    if rot.is_complex():
        xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
        return torch.view_as_real(xc * rot).flatten(-2).type_as(x)
    cos, sin = rot[..., 0], rot[..., 1]
    xf = x.float().unflatten(-1, (-1, 2))
    x0, x1 = xf[..., 0], xf[..., 1]
    return torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2).type_as(x)


@dataclass
class KVCache:
    """Keys and values of every layer for a batch of sequences; `length` positions are filled."""

    k: list[torch.Tensor]
    v: list[torch.Tensor]
    length: int = 0

    @classmethod
    def empty(cls, cfg: ModelConfig, batch: int, device, dtype, max_len: int | None = None) -> "KVCache":
        shape = (batch, cfg.kv_heads, max_len or cfg.max_seq_len, cfg.head_dim)
        return cls(
            k=[torch.empty(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)],  # only [:length] is read
            v=[torch.empty(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)],
        )

    @property
    def capacity(self) -> int:
        return self.k[0].shape[2]


@dataclass
class SlotKVCache:
    """Keys and values for up to `slots` independent sequences, each at its own position (continuous batching).

    A decoding step feeds one token for each of rows 0..B-1: row b's token goes to position `positions[b]`
    and attends to its own positions 0..positions[b]; `span` (> every position) bounds the keys read, and
    the positions beyond a row's own are masked out. Rows are filled by prefilling through `slot(b)`, a
    KVCache view of one row (writes go straight into this cache)."""

    k: list[torch.Tensor]  # (slots, kv_heads, capacity, head_dim) per layer
    v: list[torch.Tensor]
    positions: torch.Tensor | None = None  # (B,) long: where this step's token of each row goes
    span: int = 0  # keys 0..span-1 are read (max(positions) + 1)
    uniform: bool = False  # every row is at the same position: no mask needed

    @classmethod
    def empty(cls, cfg: ModelConfig, slots: int, device, dtype, max_len: int | None = None) -> "SlotKVCache":
        shape = (slots, cfg.kv_heads, max_len or cfg.max_seq_len, cfg.head_dim)
        return cls(k=[torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)],
                   v=[torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)])

    @property
    def capacity(self) -> int:
        return self.k[0].shape[2]

    def slot(self, b: int) -> KVCache:
        """Row b as a one-sequence KVCache (views, length 0): prefill a prompt into it with model.decode."""
        return KVCache(k=[t[b : b + 1] for t in self.k], v=[t[b : b + 1] for t in self.v])

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy the first `length` positions of row src into row dst (keeps the active rows contiguous)."""
        for t in (*self.k, *self.v):
            t[dst, :, :length] = t[src, :, :length]


def one_query_attention(q, k, v, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of one query per row, q (B, H, 1, hd), over keys and values (B, KV, L, hd) with H a multiple
    of KV: two small matmuls and a softmax in float32. A decoding step takes this path rather than SDPA, whose
    CPU flash kernel spends ~60 us per layer on a single query (torch.profiler, dim 256 x 6, AMD EPYC Zen 4).
    mask: (B, 1, 1, L) booleans, True where a key may be read."""
    B, H, _, hd = q.shape
    kv = k.size(1)
    qg = q.reshape(B, kv, H // kv, hd).float()
    att = (qg @ k.float().transpose(-1, -2)) * (1.0 / math.sqrt(hd))  # (B, KV, H/KV, L)
    if mask is not None:
        att = att.masked_fill(~mask, float("-inf"))
    y = att.softmax(-1) @ v.float()  # (B, KV, H/KV, hd)
    return y.reshape(B, H, 1, hd).type_as(q)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.hd = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * self.hd, bias=False)
        self.wk = nn.Linear(cfg.dim, self.n_kv * self.hd, bias=False)
        self.wv = nn.Linear(cfg.dim, self.n_kv * self.hd, bias=False)
        self.wo = nn.Linear(cfg.n_heads * self.hd, cfg.dim, bias=False)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, rot, cache: KVCache | SlotKVCache | None, layer: int, mask: torch.Tensor | None = None):
        B, T, _ = x.shape
        q, k, v = self.wq(x), self.wk(x), self.wv(x)
        q = q.view(B, T, self.n_heads, self.hd).transpose(1, 2)
        k = k.view(B, T, self.n_kv, self.hd).transpose(1, 2)
        v = v.view(B, T, self.n_kv, self.hd).transpose(1, 2)
        q, k = apply_rope(q, rot), apply_rope(k, rot)
        causal = True
        if isinstance(cache, SlotKVCache):  # one token per row, each row at its own position
            rows = torch.arange(B, device=x.device)
            cache.k[layer][rows, :, cache.positions] = k[:, :, 0]
            cache.v[layer][rows, :, cache.positions] = v[:, :, 0]
            k = cache.k[layer][:B, :, : cache.span]
            v = cache.v[layer][:B, :, : cache.span]
            causal = False
        elif cache is not None:
            start = cache.length
            cache.k[layer][:, :, start : start + T] = k
            cache.v[layer][:, :, start : start + T] = v
            k = cache.k[layer][:, :, : start + T]
            v = cache.v[layer][:, :, : start + T]
            if start > 0:
                causal = False
                if T > 1:  # a chunk after a prefix: each query sees the prefix and its own past
                    pos_q = torch.arange(start, start + T, device=x.device)[:, None]
                    mask = torch.arange(start + T, device=x.device)[None, :] <= pos_q
        gqa = self.n_kv != self.n_heads
        if T == 1 and cache is not None:  # a decoding step
            return self.resid_dropout(self.wo(one_query_attention(q, k, v, mask).reshape(B, 1, -1)))
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal and T > 1,
            enable_gqa=gqa,  # no dropout on attention weights: it forces SDPA off its fused kernels (2x slower on CPU)
        )
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.hd)
        return self.resid_dropout(self.wo(y))


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.w2 = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)
        self.w3 = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):
        return self.dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)

    def forward(self, x, rot, cache, layer, mask=None):
        x = x + self.attention(self.attention_norm(x), rot, cache, layer, mask)
        return x + self.feed_forward(self.ffn_norm(x))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.vocab_size <= 0:
            raise ValueError("ModelConfig.vocab_size must be set (from the tokenizer) before building the model")
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.dropout = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self._compiled_step = None  # set by compile_decoding()
        self.exported_step = None  # a step compiled ahead of time (model/exported_step.py), used where it fits
        self._compiled_step_ran = False
        self.compile_options: dict = {}  # extra Inductor options for the compiled step (model/precision.py sets them)
        self.precision_name: str | None = None  # the inference precision model/precision.py applied, if any
        self.register_buffer("rope", rope_table(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta), persistent=False)
        self.register_buffer("rope_real", torch.view_as_real(self.rope).clone(), persistent=False)
        self.apply(self._init_weights)
        # scaled init of the residual projections (GPT-2): keeps the residual stream's variance flat in depth
        for name, p in self.named_parameters():
            if name.endswith("wo.weight") or name.endswith("w2.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layers))

    def _apply(self, fn, recurse=True):
        # .to(dtype)/.half() would cast the complex rotary table to real: rebuild it in full precision
        super()._apply(fn, recurse)
        dev = self.tok_embeddings.weight.device
        if self.rope.device != dev or not self.rope.is_complex():
            self.rope = rope_table(self.cfg.head_dim, self.cfg.max_seq_len, self.cfg.rope_theta).to(dev)
            self.rope_real = torch.view_as_real(self.rope).clone()
        return self

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.tok_embeddings.weight.numel()
            if not self.cfg.tie_embeddings:
                n -= self.output.weight.numel()
        return n

    def forward(
        self,
        tokens: torch.Tensor,
        targets: torch.Tensor | None = None,
        cache: KVCache | None = None,
        reduction: str = "mean",
        last_only: bool = False,
    ):
        """Return (logits, loss). With targets, logits are for every position and loss is the mean (or the
        per-token losses with reduction='none'); with a cache, tokens continue the cached sequence; `last_only`:
        logits (B, 1, V) of the last position alone (a prompt's, whose other positions nobody reads)."""
        if isinstance(cache, SlotKVCache):
            return self._slot_step(tokens, cache), None
        B, T = tokens.shape
        start = cache.length if cache is not None else 0
        if start + T > self.cfg.max_seq_len or (cache is not None and start + T > cache.capacity):
            raise ValueError(f"sequence of {start + T} tokens exceeds the context of {self.cfg.max_seq_len}")
        rot = (self.rope_real if torch.compiler.is_compiling() else self.rope)[start : start + T]
        h = self.dropout(self.tok_embeddings(tokens))
        for i, layer in enumerate(self.layers):
            h = layer(h, rot, cache, i)
        h = self.norm(h[:, -1:] if last_only and targets is None else h)
        if cache is not None:
            cache.length += T
        if targets is None:
            return self.output(h), None
        logits = self.output(h)
        loss = F.cross_entropy(
            logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1, reduction=reduction
        )
        return logits, loss

    def _slot_step(self, tokens: torch.Tensor, cache: SlotKVCache) -> torch.Tensor:
        """Logits (B, 1, V) for one token per row of a SlotKVCache, row b at position cache.positions[b]."""
        pos = cache.positions
        rot = (self.rope_real if torch.compiler.is_compiling() else self.rope)[pos][:, None, None]  # (B, 1, 1, ...)
        mask = None
        if not cache.uniform:  # row b sees keys 0..pos[b]; (B, 1, 1, span), broadcast over heads
            mask = (torch.arange(cache.span, device=tokens.device)[None, :] <= pos[:, None])[:, None, None, :]
        h = self.tok_embeddings(tokens)
        for i, layer in enumerate(self.layers):
            h = layer(h, rot, cache, i, mask)
        return self.output(self.norm(h))

    @property
    def cache_dtype(self) -> torch.dtype:
        """The dtype of the keys and values decoding caches: the activations' (int8 weights run bf16 activations)."""
        return self.tok_embeddings.weight.dtype

    @property
    def decoding_capacity(self) -> int:
        """Positions in a decoding cache: the context plus one spare, so that the part read is never the whole
        buffer (a case torch.compile would specialise, and recompile for, when a story reaches the context's end).
        The compiled steps are built for this capacity."""
        return self.cfg.max_seq_len + 1

    def new_cache(self, rows: int, slots: bool = False) -> KVCache | SlotKVCache:
        """The cache that decoding uses: a KVCache of `rows` sequences in step, or with `slots` a SlotKVCache
        whose rows each keep their own position (the server's engine)."""
        kind = SlotKVCache if slots else KVCache
        return kind.empty(self.cfg, rows, self.rope.device, self.cache_dtype, max_len=self.decoding_capacity)

    def compile_decoding(self) -> "Transformer":
        """Route one-token decoding steps through torch.compile: inductor fuses each layer's norms, rotary,
        cache writes and SwiGLU into a few C++ kernels around the matmuls, and its C++ wrapper removes the
        per-op Python overhead that dominates a batch-1 step on CPU (benchmarks/generate_speed.py: ~1.3x
        faster at the 23M shape). dynamic=True: one graph for every batch size and cache position. Costs
        ~5 s of compiling on first use (more on a cold inductor cache); prompts (prefill) stay eager."""
        self._compiled_step = torch.compile(self.forward, dynamic=True,
                                            options={"cpp_wrapper": True, **self.compile_options})
        self._compiled_step_ran = False
        return self

    @property
    def decoding_is_compiled(self) -> bool:
        """compile_decoding() was called and has not fallen back to eager, or a step compiled ahead of time is set."""
        return self._compiled_step is not None or self.exported_step is not None

    def decode(self, tokens: torch.Tensor, cache: KVCache | SlotKVCache, last_only: bool = False) -> torch.Tensor:
        """Logits (B, T, V) for `tokens` continuing the sequence held in `cache` (which advances by T); with a
        SlotKVCache, one token per row at the rows' own positions (the caller advances them). `last_only`: (B, 1, V),
        the last position's alone: a prompt costs its output layer once, not once per token."""
        if self.exported_step is not None and self.exported_step.fits(tokens, cache):
            return self.exported_step(tokens, cache)
        if self._compiled_step is not None and tokens.size(1) == 1 and (isinstance(cache, SlotKVCache)
                                                                       or cache.length > 0):
            try:  # compiling happens on the first call; without a working C++ toolchain, stay eager
                logits = self._compiled_step(tokens, cache=cache)[0]
            except Exception as e:
                if self._compiled_step_ran:  # it compiled and ran before: a real error
                    raise
                # the cache is untouched until a step completes: retry eagerly
                first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
                print(f"warning: compiled decoding failed ({first}); decoding without torch.compile", file=sys.stderr)
                self._compiled_step = None
            else:
                self._compiled_step_ran = True
                return logits
        return self(tokens, cache=cache, last_only=last_only)[0]

    def flops_per_token(self) -> float:
        """Training FLOPs per token (6N plus attention), as in the PaLM paper's MFU accounting."""
        cfg = self.cfg
        matmul_params = self.num_params(non_embedding=True) + cfg.vocab_size * cfg.dim  # + the output layer
        return 6 * matmul_params + 12 * cfg.n_layers * cfg.dim * cfg.max_seq_len
