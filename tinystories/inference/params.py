"""How to sample (`SamplingParams`), the valid range of each knob, and the command-line flags that set them.

Torch-free on purpose: `tinystories CMD --help` shows these defaults without importing torch (inference/sampling.py,
which samples, re-exports everything here).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from tinystories.core.errors import UserError


@dataclass
class SamplingParams:
    """How to sample, with the defaults of every command (generate, eval, serve, train's sample stories)."""

    max_new_tokens: int = 256
    temperature: float = 0.8
    top_k: int | None = 50
    top_p: float | None = 0.95
    repetition_penalty: float = 1.0
    seed: int | None = 1234

    def validate(self) -> "SamplingParams":
        for name, (ok, says) in SAMPLING_LIMITS.items():
            value = getattr(self, name)
            if value is not None and not ok(value):
                raise UserError(f"--{name.replace('_', '-')} {value}: {says}")
        return self


# the valid values of each field: (test, what an error says); SamplingParams.validate and the CLI flags use them
SAMPLING_LIMITS: dict[str, tuple[Callable[[float], bool], str]] = {
    "max_new_tokens": (lambda v: v >= 1, "must be at least 1"),
    "temperature": (lambda v: 0.0 <= v <= 5.0, "must be between 0 (greedy) and 5"),
    "top_k": (lambda v: v >= 0, "must be >= 0 (0 = off)"),
    "top_p": (lambda v: 0.0 < v <= 1.0, "must be in (0, 1]"),
    "repetition_penalty": (lambda v: 0.0 < v <= 10.0, "must be in (0, 10] (1 = off)"),
}
_FLAG_HELP = {
    "max_new_tokens": "tokens to generate",
    "temperature": "0 = greedy",
    "top_k": "sample among the k most likely tokens; 0 = off",
    "top_p": "nucleus sampling threshold",
    "repetition_penalty": "> 1 discourages repeats (1 = off)",
    "seed": "random seed",
}


def add_sampling_args(p, max_new_tokens: int | None = None, repetition_penalty: bool = True) -> None:
    """The sampling flags (--max-new-tokens, --temperature, --top-k, --top-p, [--repetition-penalty,] --seed),
    their defaults and ranges from SamplingParams; `sampling_params(args)` reads them back."""
    from dataclasses import fields

    from tinystories.core.args import ranged

    defaults = SamplingParams()
    if max_new_tokens is not None:
        defaults.max_new_tokens = max_new_tokens
    for f in fields(SamplingParams):
        if f.name == "repetition_penalty" and not repetition_penalty:
            continue
        kind = int if f.name in ("max_new_tokens", "top_k", "seed") else float
        default = getattr(defaults, f.name)
        limit = SAMPLING_LIMITS.get(f.name)
        p.add_argument(f"--{f.name.replace('_', '-')}", type=ranged(kind, *limit) if limit else kind, default=default,
                       help=f"{_FLAG_HELP[f.name]} (default {default:g})")


def sampling_params(args) -> SamplingParams:
    """SamplingParams from the flags add_sampling_args added (--top-k 0 = off)."""
    return SamplingParams(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k or None,
        top_p=args.top_p, repetition_penalty=getattr(args, "repetition_penalty", 1.0), seed=args.seed,
    ).validate()
