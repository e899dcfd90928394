"""Right-size the CPU model to the machine, the time budget and the data (quickstart, `train --config auto`).

Two clocks decide it. Compute: the tokens the budget buys, from each candidate shape's training speed measured on
this machine (a few compiled steps as the run takes them, once per machine and cached, like the matmul peak in
calibrate.py). Data: the tokens the training text holds. The recipe study (benchmarks/recipe_study.py,
docs/training-recipe.md) found which shape reaches the lowest loss for a given number of tokens; the number of
passes over the data (bought / held) then sets the regularisation: repeated text is nearly as good as fresh up to
~4 passes (Muennighoff et al. 2023, "Scaling Data-Constrained Language Models"), past that a model of this size
memorises it (the validation loss turns up) and dropout 0.1 with Muon's weight decay recovers most of the loss;
past ~16 passes more repeats only memorise it, so the run stops there, its schedule fitted to the passes.
`choose_cpu_shape` says why in one line.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from tinystories.core.config import ModelConfig, RunConfig

RATE_STEPS = 4  # timed training steps per shape, after two that compile
# the share of a time budget a run spends outside the timed steps (evaluations, saves, data, logging) plus the
# difference of the timed steps from a run's own: 10-minute quickstarts on an AMD EPYC (Zen 4) trained at 0.78 of
# the measured rate in bf16 (dim 256 x 6, 3.6K of 4.6K tokens/s) and 0.90 in float32 limited to AVX2 (dim 192 x 4,
# 5.6K of 6.2K)
OVERHEAD_SHARE = 0.15
FRESH_PASSES = 4.0  # up to this many passes over the data: no regularisation
MANY_PASSES_DROPOUT = 0.1  # past it (0.2 was worse again in the study)
MANY_PASSES_MUON_WD = 0.2  # ... and Muon's weight decay on the block matrices (bf16 study: 0.1 worse, 0.4 the same)
# past this many passes the run stops (train.max_passes), its schedule fitted to them, before the budget ends: more
# repeats of the same text only memorise it (0.5 MB head, bf16: docs/training-recipe.md)
MAX_PASSES = 16.0


@dataclass(frozen=True)
class Regularisation:
    """What the passes over the data call for: dropout, Muon's (decoupled) weight decay, and where to stop."""

    dropout: float = 0.0
    muon_weight_decay: float = 0.0
    max_passes: float | None = None  # the run stops after this many passes (None: when the budget ends)

    def overrides(self) -> list[str]:
        stop = [f"train.max_passes={self.max_passes:g}"] if self.max_passes else []
        return [f"model.dropout={self.dropout:g}", f"train.muon_weight_decay={self.muon_weight_decay:g}", *stop]


@dataclass(frozen=True)
class Shape:
    name: str
    dim: int
    n_layers: int
    n_heads: int
    min_tokens: float  # the fewest training tokens at which the study found it beats the next smaller shape

    def overrides(self, reg: Regularisation = Regularisation()) -> list[str]:
        # the study's recipe with it: Muon for the block matrices
        return [f"model.dim={self.dim}", f"model.n_layers={self.n_layers}", f"model.n_heads={self.n_heads}",
                "train.optimizer=muon", *reg.overrides()]

    def model_config(self, vocab: int, seq_len: int = 256) -> ModelConfig:
        return ModelConfig(vocab_size=vocab, dim=self.dim, n_layers=self.n_layers, n_heads=self.n_heads,
                           max_seq_len=seq_len)

    def flops_per_token(self, vocab: int, seq_len: int = 256) -> float:
        """Training FLOPs per token, the model's own count (built on the meta device: nothing is allocated)."""
        from tinystories.model.transformer import Transformer

        with torch.device("meta"):
            return Transformer(self.model_config(vocab, seq_len)).flops_per_token()


# smallest first. min_tokens: the tokens a run must be estimated to train (rate x budget x (1 - OVERHEAD_SHARE))
# before the larger shape pays. Without native bf16 the recipe study (docs/training-recipe.md) had dim 192 x 4 ahead
# of dim 256 x 6 by 7.0% at 5 minutes and 0.6% at 10 (when dim 256 x 6 had seen 1.96M tokens). Two 10-minute
# quickstarts on one AMD EPYC (Zen 4) moved the line up: dim 256 x 6 in bf16 trained 2.0M tokens (est. 2.6M) and
# scored 1.179 bits per byte on held-out validation text, dim 192 x 4 in float32 limited to AVX2 trained 3.1M and
# scored 1.157, so 2.0M is too few. On an Intel Xeon with AMX dim 256 x 6 in bf16 trained 3.8-4.2M and scored
# 1.087-1.101 on the whole head, ahead of dim 192 x 4 (1.129 in float32): the line lies between, at ~3M.
CPU_SHAPES = [
    Shape("dim 192, 4 layers", 192, 4, 6, min_tokens=0),
    Shape("dim 256, 6 layers", 256, 6, 8, min_tokens=3.0e6),
]


def training_rate(shape: Shape, vocab: int, cfg: RunConfig, dtype: torch.dtype, compile: bool, log=print) -> float:
    """Training tokens/s of `shape` on this CPU: RATE_STEPS steps of the run's batch, optimizer, dtype and
    compilation, timed after two that compile. Measured once per machine (model/calibrate.py's cache)."""
    from tinystories.model.calibrate import cached_measure

    t = cfg.train
    key = (f"train-step|{shape.dim}x{shape.n_layers}x{shape.n_heads}|vocab {vocab}|{t.batch_size}x"
           f"{cfg.model.max_seq_len}|{t.optimizer}|{dtype}|compile {compile}")
    return cached_measure("train-rate", key, lambda: _time_steps(shape, vocab, cfg, dtype, compile),
                          lambda: log(f"model size: timing the training step of {shape.name} on this CPU "
                                      f"(once per machine) ...", flush=True))


def _time_steps(shape: Shape, vocab: int, cfg: RunConfig, dtype: torch.dtype, compile: bool) -> float:
    import time

    from tinystories.model.device import Dist, autocast_ctx
    from tinystories.model.transformer import Transformer
    from tinystories.training.optim import make_optimizer
    from tinystories.training.run import wrap_model

    cpu, t, seq = torch.device("cpu"), cfg.train, cfg.model.max_seq_len
    gen = torch.Generator().manual_seed(0)
    model = Transformer(shape.model_config(vocab, seq))
    optimizer = make_optimizer(model, t, cpu)
    step_model = wrap_model(model, Dist(), cpu, compile)  # compiled as the run compiles it
    x, y = (torch.randint(vocab, (t.batch_size, seq), generator=gen) for _ in range(2))

    def step() -> None:
        with autocast_ctx(cpu, dtype):
            _, loss = step_model(x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step(), step()
    t0 = time.perf_counter()
    for _ in range(RATE_STEPS):
        step()
    return RATE_STEPS * t.batch_size * seq / (time.perf_counter() - t0)


def regularisation_for(passes: float | None) -> tuple[Regularisation, str]:
    """The regularisation for `passes` over the training data (None: the data's size is not known), and why."""
    if passes is None:
        return Regularisation(), "no regularisation (the data's size is not known yet)"
    if passes <= FRESH_PASSES:
        return Regularisation(), (f"{passes:.1f} passes over the data: no dropout or weight decay (<= "
                                  f"{FRESH_PASSES:g} passes read as fresh text)")
    stop = MAX_PASSES if passes > MAX_PASSES else None
    reg = Regularisation(MANY_PASSES_DROPOUT, MANY_PASSES_MUON_WD, stop)
    why = (f"{passes:.1f} passes over the data: dropout {reg.dropout:g}, Muon weight decay {reg.muon_weight_decay:g} "
           f"(past {FRESH_PASSES:g} passes a model this size memorises the text)")
    if stop:
        why += f"; the run stops after {stop:g} passes (more repeats of this text only memorise it)"
    return reg, why


def choose_cpu_shape(minutes: float, rate: Callable[[Shape], float], describe_cpu: str,
                     data_tokens: float | None = None) -> tuple[Shape, Regularisation, str]:
    """The shape the study recommends for the tokens `minutes` of training buy on this CPU (`rate`: a shape's
    training tokens/s), the regularisation the passes over `data_tokens` call for, and the line that says why."""
    choice, tokens, rates = CPU_SHAPES[0], 0.0, []
    for shape in CPU_SHAPES:
        r = rate(shape)
        rates.append(f"{shape.dim} x {shape.n_layers} {r / 1000:.1f}K tok/s")
        t = minutes * 60 * (1 - OVERHEAD_SHARE) * r
        if t >= shape.min_tokens or shape is CPU_SHAPES[0]:
            choice, tokens = shape, t
    passes = tokens / data_tokens if data_tokens else None
    reg, why_reg = regularisation_for(passes)
    why = (f"{describe_cpu}, training measured at {', '.join(rates)}: {choice.name} for {minutes:g} min "
           f"(~{tokens / 1e6:.1f}M tokens); {why_reg}")
    return choice, reg, why


def sized_cpu_config(cfg_path, overrides: list[str], minutes: float, vocab: int, data_tokens: float | None = None):
    """The config at `cfg_path` with the shape and recipe the study recommends for `minutes` of training on this
    CPU and `data_tokens` of training text (the caller's overrides win over the sizing's), and the line that says
    why."""
    from tinystories.core.config import load_config
    from tinystories.model.device import choose_policy, detect_caps

    caps = detect_caps(torch.device("cpu"))
    base = load_config(cfg_path, overrides)
    policy = choose_policy(caps, base.train)
    kind = "CPU with native bf16" if caps.cpu_bf16 else "CPU without native bf16"
    kind += f" ({str(policy.dtype).removeprefix('torch.')})"
    shape, reg, why = choose_cpu_shape(
        minutes, lambda s: training_rate(s, vocab, base, policy.dtype, policy.compile), kind, data_tokens)
    sized = shape.overrides(reg)
    sized_keys = {o.split("=", 1)[0] for o in sized}
    mine = [key for key in (o.split("=", 1)[0] for o in overrides) if key in sized_keys]
    if mine:
        why += f" (yours kept: {', '.join(mine)})"
    return load_config(cfg_path, sized + overrides), why


def pick_config(on_gpu: bool) -> Path:
    """The one rule for which shipped config a device gets: the 23M model on a GPU, the CPU config (sized by
    sized_cpu_config) on a CPU."""
    from tinystories.core.config import CONFIG_DIR

    return CONFIG_DIR / ("tinystories-23M.yaml" if on_gpu else "cpu.yaml")


def auto_config(overrides: list[str]):
    """`train --config auto`: configs/tinystories-23M.yaml on a GPU; on a CPU, configs/cpu.yaml sized to this
    machine and its time budget (train.max_minutes). Returns the config and the line that says why."""
    from tinystories.core.config import load_config

    path = pick_config(on_gpu=torch.cuda.is_available())
    cfg = load_config(path, overrides)
    if torch.cuda.is_available():
        return cfg, f"GPU found: configs/{path.name}"
    if not cfg.train.max_minutes:
        return cfg, "no time budget (train.max_minutes) to size for: configs/cpu.yaml as it is"
    vocab = cfg.tokenizer.vocab_size
    if cfg.tokenizer.path:  # an existing tokenizer: its real size
        from tinystories.data.tokenizer import load_tokenizer

        vocab = load_tokenizer(cfg.tokenizer.path).vocab_size
    return sized_cpu_config(path, overrides, cfg.train.max_minutes, vocab, text_tokens(cfg))


def text_tokens(cfg: RunConfig) -> float | None:
    """Roughly the training tokens the run's data holds, before its cache is built: the local source's train
    text at BYTES_PER_TOKEN, at most data.cache_tokens (None: a download, not on disk yet)."""
    from tinystories.core.defaults import BYTES_PER_TOKEN
    from tinystories.data.text import list_text_files, split_files

    if not cfg.data.source or not Path(str(cfg.data.source)).exists():
        return None
    train, val = split_files(list_text_files(cfg.data.source, flag="data.source"))
    tokens = sum(f.stat().st_size for f in (train or val)) / BYTES_PER_TOKEN
    if not val:  # no official validation file: data.val_fraction of the stories is held out
        tokens *= 1 - cfg.data.val_fraction
    return min(tokens, cfg.data.cache_tokens or tokens)
