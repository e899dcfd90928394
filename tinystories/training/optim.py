"""Optimizers: AdamW for everything, or Muon for the blocks' weight matrices and AdamW for the rest.

`train.optimizer: adamw` (the default) is one fused `torch.optim.AdamW`: decay on matrices and embeddings, none on
norms. `train.optimizer: muon` follows the speedrun recipe (modded-nanogpt): `torch.optim.Muon` orthogonalises the
momentum of every 2-D weight inside the transformer blocks (wq, wk, wv, wo, w1, w2, w3) with its own learning rate
(`train.muon_lr`), momentum (`train.muon_momentum`, warmed up from `train.muon_momentum_start` over
`train.muon_momentum_warmup` steps) and weight decay (`train.muon_weight_decay`); the embedding (tied to the
output head) and the norms stay on AdamW with `train.lr` and `train.weight_decay`. The model is unchanged, so
Hugging Face, llama2.c and GGUF exports stay exact.

Both kinds return an object with `param_groups`, `step()`, `zero_grad()`, `state_dict()` and `load_state_dict()`;
`torch.amp.GradScaler` accepts it (it only reads `param_groups` and calls `step()`). Each param group carries its
`base_lr`; the schedule multiplies it by `lr_at(step) / train.lr` (`apply_schedule`), so both optimizers follow the
same warmup and decay.
"""

from __future__ import annotations

import torch
from torch import nn

from tinystories.core.config import TrainConfig
from tinystories.core.errors import UserError

BLOCK_MATRICES = ("wq.weight", "wk.weight", "wv.weight", "wo.weight", "w1.weight", "w2.weight", "w3.weight")


def split_params(model: nn.Module) -> tuple[list, list, list]:
    """(block matrices, other >=2-D weights (embedding / output head), 1-D weights (norms)), each parameter once
    (a tied output head is the embedding)."""
    matrices, other, vectors, seen = [], [], [], set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if p.dim() == 2 and name.endswith(BLOCK_MATRICES) and ".layers." in f".{name}":
            matrices.append(p)
        elif p.dim() >= 2:
            other.append(p)
        else:
            vectors.append(p)
    return matrices, other, vectors


class Optimizers:
    """Several torch optimizers stepped as one (Muon + AdamW). Checkpoints hold one state dict per optimizer."""

    def __init__(self, optimizers: list[torch.optim.Optimizer]):
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict]:
        return [g for o in self.optimizers for g in o.param_groups]

    @property
    def state(self) -> dict:
        return {k: v for o in self.optimizers for k, v in o.state.items()}

    def step(self) -> None:
        for o in self.optimizers:
            o.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"optimizers": [o.state_dict() for o in self.optimizers]}

    def load_state_dict(self, state: dict) -> None:
        check_optimizer_state("muon", state)
        for o, s in zip(self.optimizers, state["optimizers"]):
            o.load_state_dict(s)


def check_optimizer_state(kind: str, state: dict) -> None:
    """A checkpoint's optimizer state must come from the same train.optimizer (`kind`; Muon + AdamW saves one state
    per optimizer, AdamW one): a one-line error naming the optimizer to resume with otherwise."""
    saved = "muon" if "optimizers" in state else "adamw"
    if saved != kind or (kind == "muon" and len(state["optimizers"]) != 2):  # [Muon, AdamW]
        raise UserError(f"train.optimizer={kind}: the checkpoint's optimizer state was saved with "
                        f"train.optimizer={saved}; resume with --set train.optimizer={saved}")


class Float32Muon(torch.optim.Muon):
    """torch.optim.Muon with its Newton-Schulz orthogonalisation in float32 instead of bfloat16.

    torch runs those iterations in bf16, which a CPU without native bf16 (AVX2 only) emulates: measured with
    oneDNN/MKL/ATen limited to AVX2 on an AMD EPYC, a training step of the CPU model went from 1.0 s (AdamW) to
    7.2 s (torch's Muon), and a 2048^3 bf16 matmul ran at under 1 GFLOP/s against 47 in fp32. Same update rule,
    same param groups and state ("momentum_buffer"), so checkpoints move freely between the two classes."""

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            params, grads, bufs = [], [], []
            self._init_group(group, params, grads, bufs)
            momentum, lr = group["momentum"], group["lr"]
            for p, g, buf in zip(params, grads, bufs):
                buf.lerp_(g, 1 - momentum)
                update = g.lerp(buf, momentum) if group["nesterov"] else buf
                update = _newton_schulz_fp32(update, group["ns_coefficients"], group["ns_steps"], group["eps"])
                p.mul_(1 - lr * group["weight_decay"])
                p.add_(update.to(p.dtype), alpha=-lr * max(1.0, p.shape[0] / p.shape[1]) ** 0.5)  # "original"
        return None


def _newton_schulz_fp32(g: torch.Tensor, coefficients, steps: int, eps: float) -> torch.Tensor:
    """The quintic Newton-Schulz iteration of torch.optim.Muon (Keller Jordan's), in float32."""
    a, b, c = coefficients
    x = g.float()
    tall = x.size(0) > x.size(1)
    if tall:
        x = x.T
    x = x / x.norm().clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


def make_optimizer(model: nn.Module, t: TrainConfig, device: torch.device):
    """The optimizer `t.optimizer` names, each param group tagged with its `base_lr`."""
    matrices, other, vectors = split_params(model)
    fused = device.type in ("cuda", "cpu")
    adam_kw = dict(betas=(t.beta1, t.beta2), fused=fused)
    if t.optimizer == "adamw":
        groups = [{"params": matrices + other, "weight_decay": t.weight_decay, "base_lr": t.lr},
                  {"params": vectors, "weight_decay": 0.0, "base_lr": t.lr}]
        return torch.optim.AdamW(groups, lr=t.lr, **adam_kw)
    adamw = torch.optim.AdamW([{"params": other, "weight_decay": t.weight_decay, "base_lr": t.lr},
                               {"params": vectors, "weight_decay": 0.0, "base_lr": t.lr}], lr=t.lr, **adam_kw)
    from tinystories.model.device import cpu_has_bf16

    muon_class = Float32Muon if device.type == "cpu" and not cpu_has_bf16() else torch.optim.Muon
    muon = muon_class([{"params": matrices, "base_lr": t.muon_lr}], lr=t.muon_lr,
                      weight_decay=t.muon_weight_decay, momentum=t.muon_momentum, adjust_lr_fn="original")
    return Optimizers([muon, adamw])


def muon_momentum_at(step: int, t: TrainConfig) -> float:
    """Muon's momentum at optimizer step `step`: linear from muon_momentum_start to muon_momentum over
    muon_momentum_warmup steps (modded-nanogpt warms 0.85 -> 0.95 over its first 300 steps)."""
    if t.muon_momentum_warmup <= 0 or step >= t.muon_momentum_warmup:
        return t.muon_momentum
    frac = step / t.muon_momentum_warmup
    return t.muon_momentum_start + frac * (t.muon_momentum - t.muon_momentum_start)


def apply_schedule(optimizer, step: int, lr: float, t: TrainConfig) -> None:
    """Set every group's learning rate for this step: its base_lr scaled like the schedule's lr (lr_at) scales
    train.lr; Muon's groups also get their momentum."""
    scale = lr / t.lr
    for g in optimizer.param_groups:
        g["lr"] = g.get("base_lr", t.lr) * scale
        if "ns_steps" in g:  # a Muon group
            g["momentum"] = muon_momentum_at(step, t)


@torch.no_grad()
def zero_init_residual_projections(model: nn.Module) -> None:
    """Start every residual branch's output projection (wo, w2) at zero (modded-nanogpt): each block begins as the
    identity and grows into the residual stream. Only the initialisation changes; the architecture does not."""
    for name, p in model.named_parameters():
        if name.endswith(("wo.weight", "w2.weight")):
            p.zero_()
