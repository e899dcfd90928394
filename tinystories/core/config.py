"""One typed config for a run: model, data, tokenizer, training, output.

A run is described by one YAML file. Every key is validated: an unknown key or a wrong type is a one-line
`UserError` naming the key. `--set section.key=value` overrides any key from the command line.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from tinystories.core.atomic import write_text_atomic
from tinystories.core.defaults import SAMPLE_PROMPT, TOKENIZER_MAX_STORIES
from tinystories.core.errors import UserError

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"  # shipped in the wheel; the repo's configs/ links here


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _require_at_least_one(cfg: BaseModel, section: str, keys: tuple[str, ...]) -> None:
    """ValueError naming the first of `keys` whose value in `cfg` (config section `section`) is below 1."""
    for key in keys:
        if (value := getattr(cfg, key)) < 1:
            raise ValueError(f"{section}.{key}={value} must be >= 1")


class ModelConfig(_Strict):
    """A Llama-2 style decoder."""

    vocab_size: int = 0  # 0 = take it from the tokenizer
    dim: int = 288
    n_layers: int = 6
    n_heads: int = 6
    n_kv_heads: int | None = None  # None = n_heads (plain multi-head attention)
    hidden_dim: int | None = None  # None = 2/3 * 4 * dim rounded up to multiple_of
    multiple_of: int = 32
    max_seq_len: int = 256
    dropout: float = 0.0
    tie_embeddings: bool = True
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0

    @model_validator(mode="after")
    def _check(self) -> "ModelConfig":
        _require_at_least_one(self, "model", ("dim", "n_layers", "n_heads", "max_seq_len", "multiple_of"))
        for key in ("n_kv_heads", "hidden_dim"):
            if (value := getattr(self, key)) is not None and value < 1:
                raise ValueError(f"model.{key}={value} must be >= 1 (or null: the default)")
        if self.vocab_size < 0:
            raise ValueError(f"model.vocab_size={self.vocab_size} must be positive (0: the tokenizer's)")
        kv = self.n_kv_heads or self.n_heads
        if self.dim % self.n_heads:
            raise ValueError(f"model.dim={self.dim} must be divisible by model.n_heads={self.n_heads}")
        if (self.dim // self.n_heads) % 2:
            raise ValueError("model.dim / model.n_heads must be even (rotary embeddings rotate pairs)")
        if self.n_heads % kv:
            raise ValueError(f"model.n_heads={self.n_heads} must be a multiple of model.n_kv_heads={kv}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.dropout={self.dropout} must be in [0, 1)")
        return self

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def ffn_dim(self) -> int:
        if self.hidden_dim:
            return self.hidden_dim
        hidden = int(2 * (4 * self.dim) / 3)
        return self.multiple_of * math.ceil(hidden / self.multiple_of)


def _at_least_one(v: int | None) -> int | None:
    if v is not None and v < 1:
        raise ValueError("must be >= 1, or null to use every story")
    return v


class DataConfig(_Strict):
    """Where raw text comes from and where the token cache lives."""

    source: str | None = None  # file or directory of raw text; None = the `data fetch` directory
    data_dir: str = "data"  # where `data fetch` puts downloads; caches go to data_dir/cache
    val_fraction: float = 0.01  # held-out share when no official validation file is present
    max_stories: int | None = None
    # build only the first units of the cache holding at least this many train tokens (None: all of the text);
    # quickstart sets it from its time budget, a later larger value or null extends the same cache
    cache_tokens: int | None = None
    # plain stories, or instruct: each story behind its request (words, features, summary; data/requests.py)
    format: Literal["plain", "instruct"] = "plain"

    @field_validator("val_fraction")
    @classmethod
    def _fraction(cls, v: float) -> float:
        if not 0.0 <= v < 1.0:
            raise ValueError("must be in [0, 1), e.g. 0.01 (0 = hold out nothing)")
        return v

    @field_validator("max_stories", "cache_tokens")
    @classmethod
    def _stories(cls, v: int | None) -> int | None:
        return _at_least_one(v)


class TokenizerConfig(_Strict):
    """Either a path to an existing tokenizer, or the settings to train one."""

    path: str | None = None  # tokenizer.json, a directory holding one, or a SentencePiece .model
    vocab_size: int = 10000
    # trained on the first N stories (a bounded, deterministic sample; null = every story): see
    # benchmarks/tokenizer_sample.py for where held-out bytes/token stops improving
    max_stories: int | None = TOKENIZER_MAX_STORIES

    @field_validator("max_stories")
    @classmethod
    def _stories(cls, v: int | None) -> int | None:
        return _at_least_one(v)


class TrainConfig(_Strict):
    batch_size: int = 32  # micro-batch per process
    grad_accum: int = 1
    global_batch: int | None = None  # sequences per optimizer step over all processes; sets grad_accum
    # run length: the first of these that is set wins (steps > tokens > epochs > minutes)
    max_steps: int | None = None
    max_tokens: int | None = None
    epochs: float | None = None
    # with a time budget: at most this many passes over the training text, the schedule fitted to them (the CPU
    # sizing sets it where the budget buys more; training/sizing.py)
    max_passes: float | None = None
    max_minutes: float | None = None
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    # optimizer (training/optim.py): adamw for every weight, or muon for the blocks' matrices + adamw for the rest
    optimizer: Literal["adamw", "muon"] = "adamw"
    muon_lr: float = 0.02
    muon_momentum: float = 0.95
    muon_momentum_start: float = 0.85  # warmed up linearly to muon_momentum over muon_momentum_warmup steps
    muon_momentum_warmup: int = 300
    muon_weight_decay: float = 0.0
    zero_init_residual: bool = False  # start wo and w2 at zero (each block starts as the identity)
    # data.format=instruct: the loss on the stories only (request lines are context, data/requests.RequestTokens),
    # or on every token; measured in docs/instruct.md
    loss_on: Literal["story", "all"] = "story"
    # with loss_on=story: the loss weight of the story tokens that first write a requested word (the tokens of its
    # `Words:` line; RequestTokens.requested_words), to teach copying from the request; 1: no weighting. 5 doubled
    # the words a request gets without decoding help, for +1.6% bits per byte (docs/instruct.md)
    request_word_weight: float = 5.0
    # the order train windows are read in (training/batches.py): random offsets, or each pass over the text once in
    # a shuffled order
    windows: Literal["random", "epochs"] = "random"
    lr_schedule: Literal["cosine", "linear", "wsd"] = "cosine"  # decay after warmup; wsd: constant, then linear
    cooldown_frac: float = 0.2  # wsd: the share of the run spent decaying to min_lr
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    loss_scale_init: float | None = None  # float16: the GradScaler's first loss scale (null: torch's 65536)
    compile: bool = False
    device: str = "auto"
    seed: int = 1337
    eval_interval: int = 200
    eval_tokens: int = 65536  # size of the fixed validation subset evaluated during training
    log_interval: int = 10
    checkpoint_interval: int = 500
    early_stopping_patience: int | None = None  # evaluations without improvement before stopping
    sample_prompt: str = SAMPLE_PROMPT
    sample_tokens: int = 64
    tensorboard: bool = False
    wandb: bool = False
    wandb_project: str = "tinystories"

    @field_validator("max_steps", "max_tokens", "epochs", "max_minutes", "max_passes")
    @classmethod
    def _run_length(cls, v: float | None) -> float | None:
        # 0 is not "unset" (null is): a zero or negative run length is a mistake, not a request
        if v is not None and not 0 < v < math.inf:
            raise ValueError("must be a positive number, or null to leave it unset")
        return v

    @model_validator(mode="after")
    def _check(self) -> "TrainConfig":
        _require_at_least_one(self, "train", ("batch_size", "grad_accum", "eval_interval", "log_interval",
                                              "checkpoint_interval"))
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ValueError(f"need 0 <= train.min_lr ({self.min_lr}) <= train.lr ({self.lr}) and lr > 0")
        if not 0 < self.cooldown_frac <= 1:
            raise ValueError(f"train.cooldown_frac={self.cooldown_frac} must be > 0 and <= 1 (the share of the run "
                             f"that wsd spends decaying to min_lr)")
        if not 0 < self.request_word_weight < math.inf:
            raise ValueError(f"train.request_word_weight={self.request_word_weight} must be a positive number (1: "
                             f"no weighting)")
        if self.loss_scale_init is not None and not 0 < self.loss_scale_init < math.inf:
            raise ValueError(f"train.loss_scale_init={self.loss_scale_init} must be a positive number (or null)")
        return self


class RunConfig(_Strict):
    out_dir: str = "runs/default"
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    tokenizer: TokenizerConfig = TokenizerConfig()
    train: TrainConfig = TrainConfig()


def format_validation_error(err: ValidationError, origin: str, overrides: list[str] | None = None) -> str:
    """A pydantic error as one line naming the key, the value and where it came from (a --set, else `origin`)."""
    first = err.errors()[0]
    key = ".".join(str(p) for p in first["loc"]) or "(top level)"
    kind = first["type"]
    origin = _blame(origin, tuple(str(p) for p in first["loc"]), overrides or [], kind == "extra_forbidden")
    key = printable(key)
    if kind == "extra_forbidden":
        return f"{origin}: unknown key '{key}' (check the spelling; see configs/ for valid keys)"
    value = first.get("input")
    msg = first["msg"].removeprefix("Value error, ")
    shown = f" (got {value!r})" if value is not None and not isinstance(value, dict) else ""
    return f"{origin}: invalid value for '{key}': {msg}{shown}"


def printable(text: str) -> str:
    """`text` as an error message shows it on its one line: as is, or quoted with escapes when it holds a newline
    or another unprintable character."""
    return text if text.isprintable() else repr(text)


def _override_path(item: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in item.split("=", 1)[0].strip().split("."))


def _blame(origin: str, loc: tuple[str, ...], overrides: list[str], unknown_key: bool = False) -> str:
    """Where the offending key came from: the --set that wrote it (or a section above it; for an unknown section,
    the --set that created it), else the file, naming the --set overrides that touched the section when the
    error is about a whole section (e.g. model.dim not divisible by model.n_heads)."""
    for item in reversed(overrides):  # the last --set of a key wins
        path = _override_path(item)
        if loc[: len(path)] == path or (unknown_key and loc and path[: len(loc)] == loc):
            return f"--set {printable(item)}"
    touched = [item for item in overrides if loc and _override_path(item)[: len(loc)] == loc]
    if touched:
        return f"{origin} with " + " ".join(f"--set {printable(item)}" for item in touched)
    return origin


def parse_scalar(text: str, item: str | None = None) -> Any:
    """A --set value as YAML reads a scalar (3e-4 -> float, null -> None, true -> bool); '' stays ''. A UserError
    naming the --set `item` (else the value) when YAML cannot read it (e.g. an unclosed '[')."""
    try:
        return yaml.safe_load(text) if text != "" else ""
    except yaml.YAMLError as e:
        what = f"--set {item!r}" if item is not None else f"--set value {text!r}"
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UserError(f"{what}: not a value YAML can read ({problem}); quote it, e.g. key='\"text\"'") from None


def set_items(overrides: list[str], section: str) -> list[tuple[str, str, str]]:
    """(key, value text, the --set item) of each --set in `section` (e.g. "model"), in order."""
    out = []
    for item in overrides:
        if "=" not in item:
            continue  # apply_overrides reports it
        path = _override_path(item)
        if path[0] == section and len(path) == 2:
            out.append((path[1], item.split("=", 1)[1], item))
    return out


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply `section.key=value` strings (values parsed as YAML scalars) to a raw config dict."""
    for item in overrides:
        if "=" not in item:
            raise UserError(f"--set {item!r}: expected key=value, e.g. --set train.lr=3e-4")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        node = raw
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UserError(f"--set {item!r}: '{part}' is not a section")
        node[parts[-1]] = parse_scalar(value, item)
    return raw


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML run config (or the defaults when path is None) and apply overrides."""
    raw: dict = {}
    origin = "config"
    if path is not None:
        path = Path(path)
        origin = str(path)
        if not path.is_file():
            shipped = CONFIG_DIR / path.name
            if path.parent in (Path("."), Path("configs")) and shipped.is_file():
                path = shipped  # `configs/cpu.yaml` or `cpu.yaml` outside a checkout: the copy shipped in the package
            else:
                names = ", ".join(f"configs/{p.name}" for p in sorted(CONFIG_DIR.glob("*.yaml")))
                raise UserError(f"config file {path} not found (shipped configs: {names})")
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise UserError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(raw, dict):
            raise UserError(f"{path}: the top level must be a mapping of sections (model, data, train, ...)")
    raw = apply_overrides(raw, overrides or [])
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as e:
        raise UserError(format_validation_error(e, origin, overrides)) from None


def config_from_dict(raw: dict, origin: str = "checkpoint config") -> RunConfig:
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as e:
        raise UserError(format_validation_error(e, origin)) from None


def save_config(cfg: RunConfig, path: Path) -> None:
    write_text_atomic(path, yaml.safe_dump(cfg.model_dump(), sort_keys=False))
