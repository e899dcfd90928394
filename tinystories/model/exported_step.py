"""The one-token decoding step compiled ahead of time (AOTInductor): no Python and no guards on each step.

torch.compile's step runs Inductor's C++ kernels, but every call still enters Dynamo's frame hook and checks its
guards in Python, ~0.3 ms a step on a 2-core CPU: a third of a small model's int8 step. Here the step is exported
once per model (`torch.export`, with the batch, the cache's slots and the span of keys read as dynamic sizes),
compiled into a shared library by AOTInductor, and called with the KV cache as inputs it writes in place.

The step is the model's own continuous-batching step (`Transformer._slot_step`), so it serves both callers:
`sample` (a KVCache, every row at one position) and the server's engine (a SlotKVCache, each row at its own).
Compiling takes ~20-40 s on 2 cores, so the library is cached in ~/.cache/tinystories/aoti/ (or
$TINYSTORIES_CACHE), keyed by the weights, the precision, the shape, torch's version and the machine
(calibrate.machine_key and the CPU's feature flags: Inductor compiles for this CPU's instruction sets), and loads
in a second or two after; the 16 most recently used are kept, and a damaged one is compiled again.
$TINYSTORIES_AOT=0 keeps torch.compile's step.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn

from tinystories.core.machine import cpu_flags_digest
from tinystories.model.calibrate import cache_root, machine_key
from tinystories.model.transformer import KVCache, SlotKVCache, Transformer

MAX_ROWS = 256  # the largest batch (and number of cache slots) the exported step accepts
KEEP_STEPS = 16  # compiled steps kept in the cache folder, the most recently used (one per model and precision)


class _Step(nn.Module):
    """forward(tokens (B, 1), positions (B,), span (S,) any values: only its length counts, k, v) -> logits."""

    def __init__(self, model: Transformer):
        super().__init__()
        self.model = model

    def forward(self, tokens, positions, span, k: list[torch.Tensor], v: list[torch.Tensor]):
        cache = SlotKVCache(k, v, positions=positions, span=span.size(0), uniform=False)
        return self.model._slot_step(tokens, cache)


def weights_digest(model: Transformer) -> str:
    """sha256 of every parameter's values (int8 weights through their dequantized float form)."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        t = p.detach()
        if hasattr(t, "dequantize") and type(t) is not torch.Tensor:
            t = t.dequantize()
        h.update(name.encode())
        h.update(t.float().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def package_path(model: Transformer, capacity: int) -> Path:
    """Where the compiled step of this model (weights, precision, shape) on this machine is cached."""
    key = "|".join([machine_key(), cpu_flags_digest(), str(model.cfg), str(model.precision_name),
                    str(model.compile_options), str(capacity), weights_digest(model)])
    return cache_root() / "aoti" / f"step-{hashlib.sha256(key.encode()).hexdigest()[:20]}.pt2"


def _export(model: Transformer, capacity: int, dtype: torch.dtype, path: Path) -> None:
    cfg = model.cfg
    shape = (3, cfg.kv_heads, capacity, cfg.head_dim)
    k = [torch.zeros(shape, dtype=dtype) for _ in range(cfg.n_layers)]
    v = [torch.zeros(shape, dtype=dtype) for _ in range(cfg.n_layers)]
    example = (torch.tensor([[1], [2]]), torch.tensor([3, 7]), torch.empty(8), k, v)
    rows = torch.export.Dim("rows", min=1, max=MAX_ROWS)
    slots = torch.export.Dim("slots", min=1, max=MAX_ROWS)
    span = torch.export.Dim("span", min=2, max=capacity - 1)  # never the whole buffer: that size is specialised
    per_layer = [{0: slots}] * cfg.n_layers
    with torch.no_grad():
        program = torch.export.export(_Step(model).eval(), example,
                                      dynamic_shapes=({0: rows}, {0: rows}, {0: span}, per_layer, per_layer))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".pt2", dir=path.parent)
    os.close(fd)
    try:
        torch._inductor.aoti_compile_and_package(program, package_path=tmp,
                                                 inductor_configs=dict(model.compile_options))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def prune_cache(folder: Path, keep: Path, most: int = KEEP_STEPS) -> None:
    """Delete all but the `most` most recently used compiled steps in `folder` (never `keep`)."""
    steps = sorted(folder.glob("step-*.pt2"), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in [p for p in steps if p != keep][max(0, most - 1):]:
        old.unlink(missing_ok=True)


class ExportedStep:
    """The compiled step of one model on the CPU, for caches of `capacity` positions; call it as decode() would."""

    def __init__(self, model: Transformer, capacity: int, dtype: torch.dtype, log=None):
        path = package_path(model, capacity)
        self.compiled_now = False
        self.runner = None
        if path.is_file():
            try:
                self.runner = torch._inductor.aoti_load_package(str(path))
                os.utime(path)  # recently used: kept by prune_cache
            except Exception:  # damaged (a copied cache, a disk error): compiled again below
                path.unlink(missing_ok=True)
        if self.runner is None:
            if log:
                log(f"compiling the decoding step ahead of time (AOTInductor, cached in {path.parent})...")
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*LeafSpec", category=FutureWarning)  # torch's own pytree
                _export(model, capacity, dtype, path)
            self.compiled_now = True
            prune_cache(path.parent, keep=path)
            self.runner = torch._inductor.aoti_load_package(str(path))
        self.capacity = capacity
        self.path = path
        self._span = torch.empty(capacity)
        self._positions = torch.arange(capacity)  # a batch-1 step's position: a slice, no new tensor

    def fits(self, tokens: torch.Tensor, cache: KVCache | SlotKVCache) -> bool:
        """Whether this call is a one-token step the exported sizes cover."""
        span = cache.span if isinstance(cache, SlotKVCache) else cache.length + 1
        return (tokens.size(1) == 1 and tokens.device.type == "cpu" and cache.capacity == self.capacity
                and 2 <= span < self.capacity and tokens.size(0) <= MAX_ROWS and cache.k[0].size(0) <= MAX_ROWS
                and cache.k[0].is_contiguous())

    def __call__(self, tokens: torch.Tensor, cache: KVCache | SlotKVCache) -> torch.Tensor:
        # the compiled code assumes the example's contiguous strides and does not check them
        tokens = tokens.contiguous()
        if isinstance(cache, SlotKVCache):
            return self.runner(tokens, cache.positions.contiguous(), self._span[: cache.span], cache.k, cache.v)
        n = cache.length
        positions = self._positions[n : n + 1] if tokens.size(0) == 1 else torch.full((tokens.size(0),), n)
        logits = self.runner(tokens, positions, self._span[: n + 1], cache.k, cache.v)
        cache.length += 1
        return logits


def compile_for_decoding(model: Transformer, log=None) -> str:
    """Compile `model`'s one-token step, the fastest way that works here; returns how. On a CPU: ahead of time
    (ExportedStep), unless $TINYSTORIES_AOT=0 or it fails (a one-line warning); otherwise, or as the fallback,
    torch.compile (Transformer.compile_decoding), which itself stays eager if it cannot compile."""
    import sys

    cpu = model.tok_embeddings.weight.device.type == "cpu"
    if cpu and os.environ.get("TINYSTORIES_AOT", "1") != "0":
        try:
            model.exported_step = ExportedStep(model, model.decoding_capacity, model.cache_dtype, log)
            return "ahead of time (AOTInductor)"
        except Exception as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
            print(f"warning: compiling the decoding step ahead of time failed ({first}); using torch.compile",
                  file=sys.stderr)
    model.compile_decoding()
    return "torch.compile"
