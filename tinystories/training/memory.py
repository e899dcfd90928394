"""Peak training memory on a GPU, estimated before the first step, and the micro-batch that fits.

`estimate_memory` counts what one training step holds at its peak, in bytes:

- weights (float32 master copy), gradients (float32), optimizer state (AdamW: two float32 moments per weight;
  `optimizer="muon"`: one float32 momentum buffer per block matrix wq wk wv wo w1 w2 w3, AdamW moments for the
  embedding and the norms), DDP's gradient buckets (one more float32 copy of the gradients);
- the low-precision copies of the matmul weights that autocast makes and backward keeps;
- the activations saved for backward by one micro-batch of B sequences of T tokens (N = B*T), exactly what
  tinystories/model.py saves in eager mode (tests/test_memory.py checks the count against autograd's own list
  of saved tensors). With `a` the autocast dtype's bytes (2 for bf16/fp16, 4 for float32), per layer:
    * two RMSNorms, each: its float32 input, the normalised float32 input (for the weight's gradient) and
      1/rms: 2 x (8ND + 4N)
    * the attention's input to wq, wk, wv: autocast casts it once per matmul (3aND); in float32 the three share
      it (4ND); the FFN's input to w1, w3 likewise (2aND, or 4ND)
    * SDPA (flash / memory-efficient kernels): rotated q, k, v, the output (which wo reuses) and the float32
      log-sum-exp: a(2ND + 2N*kv_heads*head_dim) + 4N*heads
    * SwiGLU: w1's output, silu's output, w3's output, their product (w2's input): 4aNF
    * dropout masks (one byte per element) where model.dropout > 0: 2ND
  plus the token ids, the final norm and the output layer's input;
- the loss head, whose peak dominates small models with big vocabularies: at the start of backward the logits
  (aNV, returned by forward and alive until the step ends), log_softmax's float32 output (4NV), its incoming
  gradient (4NV) and the gradient it produces (4NV) are alive together: (a + 12)NV.

That is an upper bound for `torch.compile`, whose partitioner recomputes cheap elementwise ops instead of saving
them and fuses the loss head. Not counted: the CUDA context and the caching allocator's reserve (outside
`torch.cuda.max_memory_allocated`), cuBLAS workspaces, NCCL buffers: `pick_micro_batch` keeps a margin for them.

`pick_micro_batch` picks the largest micro-batch that divides the per-process batch (the global batch is kept by
gradient accumulation) and whose estimate fits the memory budget with that margin. Both functions are pure: the
budget comes from `cuda_budget(device)` or from the caller.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tinystories.core.config import ModelConfig
from tinystories.core.errors import UserError

GiB = 2**30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
BLOCK_MATRICES = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")


def _dtype_name(dtype: torch.dtype | str) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPE_BYTES:
        raise ValueError(f"dtype {dtype!r}: expected float32, bfloat16 or float16")
    return name


@dataclass(frozen=True)
class ParamCounts:
    """Parameters of a model config, split the way the optimizers and autocast see them."""

    embedding: int  # token embedding (also the output layer when tied)
    output: int  # an untied output layer (0 when tied)
    block_matrices: int  # wq wk wv wo w1 w2 w3 of every layer
    norms: int  # RMSNorm weights

    @property
    def total(self) -> int:
        return self.embedding + self.output + self.block_matrices + self.norms

    @property
    def matmul(self) -> int:
        """Weights that go through a matmul (and get an autocast copy): the blocks' matrices and the output layer
        (the embedding itself when tied)."""
        return self.block_matrices + (self.output or self.embedding)


def param_counts(cfg: ModelConfig) -> ParamCounts:
    D, F, V, L = cfg.dim, cfg.ffn_dim, cfg.vocab_size, cfg.n_layers
    kv = cfg.kv_heads * cfg.head_dim
    per_layer = D * D + 2 * D * kv + D * D + 3 * D * F  # wq, wk + wv, wo, w1 w2 w3
    return ParamCounts(embedding=V * D, output=0 if cfg.tie_embeddings else V * D, block_matrices=L * per_layer,
                       norms=(2 * L + 1) * D)


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes held at the peak of a training step (see the module docstring for what each part counts)."""

    micro_batch: int
    seq_len: int
    dtype: str
    weights: int
    gradients: int
    optimizer: int
    ddp_buckets: int
    autocast_weights: int
    activations: int  # saved for backward, the loss head's tensors excepted
    loss_head: int  # logits and cross-entropy at their peak (the start of backward)

    @property
    def fixed(self) -> int:
        """What does not grow with the micro-batch."""
        return self.weights + self.gradients + self.optimizer + self.ddp_buckets + self.autocast_weights

    @property
    def per_micro_batch(self) -> int:
        return self.activations + self.loss_head

    @property
    def total(self) -> int:
        return self.fixed + self.per_micro_batch

    def describe(self) -> str:
        """One line: the total and its parts in GiB."""
        g = lambda b: f"{b / GiB:.2f}"  # noqa: E731
        opt = f" + DDP buckets {g(self.ddp_buckets)}" if self.ddp_buckets else ""
        cast = f" + {self.dtype} weight copies {g(self.autocast_weights)}" if self.autocast_weights else ""
        return (f"estimated peak {g(self.total)} GiB at micro-batch {self.micro_batch} x {self.seq_len} "
                f"({self.dtype}): weights {g(self.weights)} + grads {g(self.gradients)} + optimizer "
                f"{g(self.optimizer)}{opt}{cast} + activations {g(self.activations)} + logits/loss {g(self.loss_head)}")


def estimate_memory(cfg: ModelConfig, micro_batch: int, dtype: torch.dtype | str, seq_len: int | None = None,
                    optimizer: str = "adamw", ddp: bool = False) -> MemoryEstimate:
    """Peak bytes of one training step (forward + backward + optimizer) of `cfg` on a GPU, for a micro-batch of
    `micro_batch` sequences of `seq_len` tokens (default: the model's context) under `dtype` autocast
    (float32: none). Pure arithmetic: nothing is allocated."""
    if cfg.vocab_size <= 0:
        raise ValueError("estimate_memory needs model.vocab_size (take it from the tokenizer first)")
    if optimizer not in ("adamw", "muon"):
        raise ValueError(f"optimizer {optimizer!r}: expected adamw or muon")
    name = _dtype_name(dtype)
    a = DTYPE_BYTES[name]
    mixed = a != 4
    T = seq_len or cfg.max_seq_len
    N = micro_batch * T
    D, F, V, L = cfg.dim, cfg.ffn_dim, cfg.vocab_size, cfg.n_layers
    kv = cfg.kv_heads * cfg.head_dim
    p = param_counts(cfg)

    weights = 4 * p.total
    gradients = 4 * p.total
    if optimizer == "adamw":
        opt = 8 * p.total
    else:  # Muon: a momentum buffer per block matrix; AdamW's two moments for the rest
        opt = 4 * p.block_matrices + 8 * (p.total - p.block_matrices)
    ddp_buckets = 4 * p.total if ddp else 0
    autocast_weights = a * p.matmul if mixed else 0

    norm = 8 * N * D + 4 * N  # float32 input, normalised input, 1/rms
    attn_in = 3 * a * N * D if mixed else 4 * N * D
    ffn_in = 2 * a * N * D if mixed else 4 * N * D
    sdpa = a * (2 * N * D + 2 * N * kv) + 4 * N * cfg.n_heads
    swiglu = 4 * a * N * F
    masks = 2 * N * D if cfg.dropout > 0 else 0
    per_layer = 2 * norm + attn_in + ffn_in + sdpa + swiglu + masks
    tokens = 8 * micro_batch * (T + 1) + 8 * N  # the (B, T+1) batch x and y view, the flattened targets
    head_in = norm + (a * N * D if mixed else 4 * N * D) + (N * D if cfg.dropout > 0 else 0)  # + embedding dropout
    activations = L * per_layer + tokens + head_in
    loss_head = (a + 12) * N * V
    return MemoryEstimate(micro_batch=micro_batch, seq_len=T, dtype=name, weights=weights, gradients=gradients,
                          optimizer=opt, ddp_buckets=ddp_buckets, autocast_weights=autocast_weights,
                          activations=activations, loss_head=loss_head)


def pick_micro_batch(cfg: ModelConfig, per_process_batch: int, budget_bytes: int, dtype: torch.dtype | str,
                     seq_len: int | None = None, optimizer: str = "adamw", ddp: bool = False,
                     margin: float = 0.10, reserve_bytes: int = 256 * 2**20) -> tuple[int, MemoryEstimate]:
    """The largest micro-batch that divides `per_process_batch` (sequences per optimizer step and process, i.e.
    global batch / processes; accumulation makes up the rest) whose estimated peak fits in
    budget_bytes * (1 - margin) - reserve_bytes. Returns (micro-batch, its estimate); a UserError when not even
    one sequence fits."""
    if per_process_batch < 1:
        raise ValueError(f"per_process_batch={per_process_batch} must be >= 1")
    usable = budget_bytes * (1 - margin) - reserve_bytes
    for b in sorted((d for d in range(1, per_process_batch + 1) if per_process_batch % d == 0), reverse=True):
        est = estimate_memory(cfg, b, dtype, seq_len, optimizer, ddp)
        if est.total <= usable:
            return b, est
    one = estimate_memory(cfg, 1, dtype, seq_len, optimizer, ddp)
    raise UserError(f"even a micro-batch of 1 sequence needs ~{one.total / GiB:.2f} GiB ({one.describe()}) but "
                    f"{budget_bytes / GiB:.2f} GiB are available; use a smaller model or a shorter context "
                    f"(--set model.max_seq_len=...), or a GPU with more memory")


def cuda_budget(device: torch.device) -> int:
    """Bytes this process can use for training on a CUDA device: what is free plus what torch already holds
    (the model's weights, once moved there, count in the estimate)."""
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device)
