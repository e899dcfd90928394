"""Checkpoints: one self-contained directory per save, written atomically, loaded by every command.

    checkpoint/
        model.safetensors   weights (the tied output matrix is stored once, as tok_embeddings.weight)
        config.yaml         the full run config, with model.vocab_size filled in
        tokenizer.json | tokenizer.model   a copy of the tokenizer
        state.json          step, tokens seen, metrics, schedule length
        trainer.pt          optimizer and RNG states (tensors and plain containers only: weights_only=True)
        checksums.json      the SHA-256 of every file above, written last: weights, tokenizer or trainer state
                            that changed after they were written (a flipped bit, a truncated copy) are an error
                            when loaded (config.yaml and state.json are text a user may edit; they are parsed)

A run directory keeps `checkpoints/step-XXXXXXXX/` directories and two symlinks, `latest` and `best`, swapped
with an atomic rename: a crash at any point leaves the previous checkpoint loadable.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file

from tinystories.core.atomic import disk_full_is_user_error, fsync_tree_files, replace_symlink, swap_in_dir
from tinystories.core.config import RunConfig, config_from_dict, parse_scalar, save_config, set_items
from tinystories.core.errors import UserError
from tinystories.data.integrity import sha256_file
from tinystories.data.tokenizer import TextTokenizer, copy_tokenizer, load_tokenizer
from tinystories.model.transformer import Transformer

WEIGHTS = "model.safetensors"
CHECKSUMS = "checksums.json"


def model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weights to save: no `module.`/`_orig_mod.` prefixes (DDP, compile), tied output stored once."""
    raw = unwrap(model)
    sd = {k: v.detach().contiguous() for k, v in raw.state_dict().items()}
    if raw.cfg.tie_embeddings:
        sd.pop("output.weight", None)
    return sd


def unwrap(model: torch.nn.Module) -> Transformer:
    while True:
        if hasattr(model, "module"):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def write_checkpoint_dir(
    dest: Path, model: torch.nn.Module, cfg: RunConfig, tok: TextTokenizer, state: dict,
    trainer_state: dict | None = None,
) -> None:
    """Write a complete checkpoint into `dest` (created) and fsync it."""
    dest.mkdir(parents=True)
    weights = {k: v.to("cpu", torch.float32) if v.is_floating_point() else v.cpu()
               for k, v in model_state(model).items()}
    save_file(weights, str(dest / WEIGHTS), metadata={"format": "pt"})
    save_config(cfg, dest / "config.yaml")
    copy_tokenizer(tok, dest)
    (dest / "state.json").write_text(json.dumps(state, indent=2))
    if trainer_state is not None:
        torch.save(trainer_state, dest / "trainer.pt")
    write_checksums(dest)
    fsync_tree_files(dest)


def write_checksums(dest: Path) -> None:
    """Record the SHA-256 of every file in checkpoint directory `dest` (written last, before the fsync)."""
    sums = {f.name: sha256_file(f) for f in sorted(dest.iterdir()) if f.is_file() and f.name != CHECKSUMS}
    (dest / CHECKSUMS).write_text(json.dumps({"sha256": sums}, indent=2))


def verify_file(ck_path: Path, name: str) -> None:
    """Check one file of a checkpoint against its recorded SHA-256. Checkpoints written before checksums were
    recorded (no checksums.json) and files it does not list pass unchecked."""
    record = ck_path / CHECKSUMS
    if not record.is_file():
        return
    try:
        sums = json.loads(record.read_text(encoding="utf-8"))["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(f"{record}: unreadable checksum record (truncated or edited); restore the checkpoint from "
                        f"a copy you trust, or use another one in its run's checkpoints/") from None
    if name in sums and (ck_path / name).is_file() and sha256_file(ck_path / name) != sums[name]:
        raise UserError(f"{ck_path / name}: checksum mismatch: the file changed after it was written (a corrupt or "
                        f"edited copy); restore it, or use another checkpoint in its run's checkpoints/")


def save_checkpoint(
    run_dir: Path, model, cfg: RunConfig, tok: TextTokenizer, state: dict, trainer_state: dict, is_best: bool
) -> Path:
    """Save as `latest` (and `best` when is_best) atomically; remove checkpoints no link points at."""
    ckdir = Path(run_dir) / "checkpoints"
    ckdir.mkdir(parents=True, exist_ok=True)
    name = f"step-{state['step']:08d}"
    final = ckdir / name
    tmp = ckdir / f".tmp-{name}-{os.getpid()}"
    for stale in ckdir.glob(".tmp-step-*"):  # half-written checkpoints of a killed run (one trainer writes a run)
        shutil.rmtree(stale, ignore_errors=True)
    try:
        with disk_full_is_user_error(final, "checkpoint"):  # a full disk: the half-written copy goes, `latest` stays
            write_checkpoint_dir(tmp, model, cfg, tok, state, trainer_state)
        # re-saving the same step (e.g. Ctrl-C right after a save) keeps the old one until the new is in place
        swap_in_dir(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    replace_symlink(ckdir / "latest", name)
    if is_best:
        replace_symlink(ckdir / "best", name)
    keep = {os.readlink(ckdir / n) for n in ("latest", "best") if (ckdir / n).is_symlink()}
    for d in ckdir.iterdir():
        if d.is_dir() and not d.is_symlink() and d.name.startswith("step-") and d.name not in keep:
            shutil.rmtree(d, ignore_errors=True)
    return final


def resolve_checkpoint(path: str | Path, prefer: str = "best") -> Path:
    """A checkpoint directory from a run directory (its best, else latest) or a checkpoint directory."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"{p}: no such checkpoint or run directory")
    if (p / WEIGHTS).is_file():
        return p
    ckdir = p / "checkpoints"
    for name in (prefer, "latest", "best"):
        cand = ckdir / name
        if (cand / WEIGHTS).is_file():
            return cand.resolve()
    raise UserError(
        f"{p}: not a checkpoint (no {WEIGHTS}) nor a run directory with checkpoints/latest; "
        f"train one with `tinystories train` or import one with `tinystories import llama2c`"
    )


@dataclass
class Checkpoint:
    path: Path
    cfg: RunConfig
    tokenizer: TextTokenizer
    state: dict

    @property
    def step(self) -> int:
        return int(self.state.get("step", 0))


def read_checkpoint(path: str | Path, prefer: str = "best") -> Checkpoint:
    ck = resolve_checkpoint(path, prefer)
    cfg_file = ck / "config.yaml"
    if not cfg_file.is_file():
        raise UserError(f"{ck}: checkpoint has no config.yaml")
    for name in ("tokenizer.json", "tokenizer.model"):  # the weights when loaded; config and state stay editable
        verify_file(ck, name)
    try:
        raw = yaml.safe_load(cfg_file.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError:
        raise UserError(f"{cfg_file}: not valid YAML") from None
    cfg = config_from_dict(raw, str(cfg_file))
    tok = load_tokenizer(ck)
    if cfg.model.vocab_size != tok.vocab_size:
        raise UserError(f"{ck}: model vocab_size {cfg.model.vocab_size} does not match its tokenizer's "
                        f"{tok.vocab_size}")
    state = json.loads((ck / "state.json").read_text()) if (ck / "state.json").is_file() else {}
    return Checkpoint(ck, cfg, tok, state)


# model.* keys that are not architecture: they may differ between a checkpoint and a run that loads its weights
NOT_ARCHITECTURE = ("dropout",)


def architecture(m) -> dict:
    """The architecture of a ModelConfig: every model.* key that the weights (or what they compute) depend on, with
    the derived values filled in (n_kv_heads None -> n_heads, hidden_dim None -> the computed width)."""
    arch = {k: getattr(m, k) for k in type(m).model_fields if k not in NOT_ARCHITECTURE}
    arch["n_kv_heads"] = m.kv_heads
    arch["hidden_dim"] = m.ffn_dim
    return arch


def architecture_diff(m, ref) -> tuple[str, object, object] | None:
    """The first architecture key where ModelConfig `m` differs from `ref`: (key, m's value, ref's value), else None.
    A vocab_size of 0 ("take it from the tokenizer") matches any vocabulary."""
    a, b = architecture(m), architecture(ref)
    for key in a:
        if key == "vocab_size" and a[key] == 0:
            continue
        if a[key] != b[key]:
            return key, a[key], b[key]
    return None


def check_compatible(ck: Checkpoint, cfg: RunConfig, tok: TextTokenizer | None, *, resume: bool,
                     where: str | Path, overrides: Sequence[str] = (), origin: str = "the config") -> None:
    """The one rule for a run that loads a checkpoint's weights: the same architecture (every model.* key but
    dropout; a vocab_size of 0 follows the tokenizer) and the same tokenizer, compared by hash.

    `resume`: the run `where` continues from `ck`; else a new run starts from `ck` (--init-from `where`). `tok` is the
    run's tokenizer, or None before it exists: a resumed run's tokenizer still to be trained must then come from the
    settings the run had; a fine-tuning run's tokenizer is the checkpoint's, and only what a --set asks is compared.
    A mismatch is a UserError naming the key, the --set (or `origin`) that asked for it, and what to do."""
    overrides = list(overrides)
    diff = architecture_diff(cfg.model, ck.cfg.model)
    if diff:
        key, new, old = diff
        item = next((item for k, _, item in reversed(set_items(overrides, "model")) if k == key), None)
        if resume:
            asked = f"; --set {item} asks for {new}" if item else f"; {origin} now has {new}"
            raise UserError(f"--resume: model.{key} cannot change on resume (the run has {old}){asked}: the weights "
                            f"have the run's shape; another architecture is a new run (--config ... --out NEW_RUN)")
        why = f"--set {item}: model.{key}" if item else f"--init-from {where}: the run's model.{key} ({new})"
        raise UserError(f"{why} cannot differ from the --init-from checkpoint ({old}); the architecture comes from "
                        f"{ck.path} (leave model.{key} out)")
    old_tok = ck.tokenizer
    trained_with = f"{old_tok.kind} {old_tok.vocab_size}-token {old_tok.path.name}"
    if resume:
        if tok is not None:
            changed, what = tok.sha256 != old_tok.sha256, str(tok.path)
        else:
            changed = (cfg.tokenizer.model_dump() != ck.cfg.tokenizer.model_dump()
                       or cfg.data.data_dir != ck.cfg.data.data_dir)
            what = f"a new {cfg.tokenizer.vocab_size}-token tokenizer"
        if changed:
            sets = [i for i in overrides if i.split("=", 1)[0].strip().startswith(("tokenizer.", "data.data_dir"))]
            via = f" ({' '.join('--set ' + i for i in sets)})" if sets else ""
            raise UserError(f"--resume: the tokenizer cannot change on resume: the run was trained with "
                            f"{trained_with}, the config now gives {what}{via}; start a new run, or fine-tune with "
                            f"--init-from {where} --out NEW_RUN")
        return

    def differs(blame: str, key: str) -> UserError:
        return UserError(f"{blame}: the tokenizer cannot differ from the --init-from checkpoint's ({trained_with}, "
                         f"which its weights were trained with); leave tokenizer.{key} out")

    for key, text, item in set_items(overrides, "tokenizer"):
        if key == "path":
            same = load_tokenizer(parse_scalar(text)).sha256 == old_tok.sha256
        elif key == "vocab_size":
            same = parse_scalar(text) == old_tok.vocab_size
        else:
            continue  # tokenizer.max_stories: only for training a tokenizer, which a fine-tune does not do
        if not same:
            raise differs(f"--set {item}", key)
    if tok is not None and tok.sha256 != old_tok.sha256:
        raise differs(f"--init-from {where}", "path")


def load_weights(model: Transformer, ck_path: Path) -> None:
    verify_file(ck_path, WEIGHTS)
    try:
        sd = load_file(str(ck_path / WEIGHTS))
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise UserError(f"{ck_path / WEIGHTS}: cannot read weights ({str(e).splitlines()[0][:100]})") from None
    if model.cfg.tie_embeddings:
        sd.setdefault("output.weight", sd.get("tok_embeddings.weight"))
    expected = model.state_dict()
    missing = [k for k in expected if k not in sd]
    extra = [k for k in sd if k not in expected]
    wrong = [k for k in expected if k in sd and tuple(sd[k].shape) != tuple(expected[k].shape)]
    if missing or extra or wrong:
        detail = (f"missing {missing[:2]}" if missing else f"unexpected {extra[:2]}" if extra
                  else f"{wrong[0]} has shape {tuple(sd[wrong[0]].shape)}, the config needs "
                       f"{tuple(expected[wrong[0]].shape)}")
        raise UserError(f"{ck_path}: weights do not match the architecture in its config.yaml ({detail})")
    model.load_state_dict(sd, strict=True)


def load_model(path: str | Path, device: str | torch.device = "cpu",
               prefer: str = "best") -> tuple[Transformer, Checkpoint]:
    """Load a checkpoint (run dir or checkpoint dir) for inference: model in eval mode on `device`."""
    ck = read_checkpoint(path, prefer)
    model = Transformer(ck.cfg.model)
    load_weights(model, ck.path)
    model.to(device).eval()
    return model, ck


def load_trainer_state(ck_path: Path) -> dict:
    f = ck_path / "trainer.pt"
    if not f.is_file():
        raise UserError(f"{ck_path}: checkpoint has no trainer.pt (optimizer state), so it cannot be resumed; use "
                        f"--init-from to fine-tune from it")
    verify_file(ck_path, "trainer.pt")
    try:  # weights_only: tensors and plain containers, never code, whatever the file holds
        with warnings.catch_warnings():  # torch warns about a foreign pickle's protocol before refusing it
            warnings.simplefilter("ignore")
            return torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle.UnpicklingError, a truncated zip, ...: one line, not torch's advice to file a bug
        raise UserError(f"{f}: not a trainer state this toolkit wrote, refused to load it ({type(e).__name__}); "
                        f"resume from a run you trust, or fine-tune from its weights with --init-from") from None
