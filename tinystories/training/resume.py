"""Where a `train` run starts from, resolved before anything is built: --resume RUN_DIR (the run's own config,
checked against its checkpoint) and --init-from CHECKPOINT (a new run with the checkpoint's architecture and
tokenizer). Every check that can fail is made here, before a tokenizer or cache is built or a run replaced."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import ValidationError

from tinystories.core.config import RunConfig, format_validation_error, load_config, parse_scalar, set_items
from tinystories.core.errors import UserError
from tinystories.core.runs import checkpoints_dir, run_dir_of
from tinystories.data.tokenizer import load_tokenizer, tokenizer_file_name
from tinystories.model.checkpoint import WEIGHTS, Checkpoint, architecture, check_compatible, read_checkpoint


def configured_tokenizer(cfg: RunConfig) -> Path | None:
    """The tokenizer file a run's config names (tokenizer.path, else data_dir/tokenizer-VOCAB), or None when it
    does not exist yet (it would be trained)."""
    from tinystories.data.prepare import DEFAULT_TOKENIZER_DIR
    from tinystories.data.tokenizer import find_tokenizer_file

    if cfg.tokenizer.path:
        return find_tokenizer_file(cfg.tokenizer.path)  # a missing path is an error
    f = Path(cfg.data.data_dir) / f"{DEFAULT_TOKENIZER_DIR}-{cfg.tokenizer.vocab_size}" / "tokenizer.json"
    return f if f.is_file() else None


def check_run_dir(run_dir: Path) -> None:
    """--resume RUN_DIR names a run directory with a checkpoint to continue from."""
    hint = "pass a run directory made by `tinystories train`, e.g. runs/cpu"
    if not run_dir.exists():
        raise UserError(f"--resume {run_dir}: no such run directory; {hint}")
    if not run_dir.is_dir():
        raise UserError(f"--resume {run_dir}: not a directory; {hint}")
    if (run_dir / WEIGHTS).is_file():  # a checkpoint directory, not a run directory
        run = run_dir_of(run_dir.resolve())
        if run is not None and (run_dir / "trainer.pt").is_file() and (run / "config.yaml").is_file():
            raise UserError(f"--resume {run_dir}: a checkpoint inside the run {run}; resume the run: "
                            f"--resume {run}")
        raise UserError(f"--resume {run_dir}: not a training run (an imported/exported checkpoint): fine-tune it "
                        f"with --init-from {run_dir} --out NEW_RUN")
    if not (run_dir / "config.yaml").is_file():
        raise UserError(f"--resume {run_dir}: not a run directory (no config.yaml); {hint}")
    if not any((checkpoints_dir(run_dir) / n / WEIGHTS).is_file() for n in ("latest", "best")):
        raise UserError(f"--resume {run_dir}: the run has no checkpoint to continue from (it stopped before its "
                        f"first save); start it again with `tinystories train --config {run_dir / 'config.yaml'} "
                        f"--out {run_dir}`")


def resume_config(args, overrides: list[str]) -> RunConfig:
    """The config of a resumed run, with every check that can fail made before the tokenizer or cache is built."""
    run_dir = Path(args.resume)
    if args.config:
        raise UserError(f"--config and --resume cannot be combined: a resumed run keeps its own config "
                        f"({run_dir / 'config.yaml'}); change keys with --set")
    if args.init_from:
        raise UserError(f"--init-from and --resume cannot be combined: --resume {run_dir} continues that run with its "
                        f"own weights; --init-from starts a new run from a checkpoint (give it --out NEW_RUN)")
    if args.out and Path(args.out).resolve() != run_dir.resolve():
        raise UserError(f"--out and --resume cannot be combined: a resumed run stays in {run_dir}; to start a new "
                        f"run from its weights use --init-from {run_dir} --out {args.out}")
    check_run_dir(run_dir)
    ck = read_checkpoint(run_dir, prefer="latest")
    cfg = load_config(run_dir / "config.yaml", overrides)
    cfg.out_dir = str(run_dir)
    if args.data:
        cfg.data.source = args.data
    # the tokenizer: compared now when it exists; one still to be trained must come from unchanged settings
    # (the trainer compares it with the checkpoint's once it is there)
    tok_file = configured_tokenizer(cfg)
    tok = load_tokenizer(tok_file) if tok_file is not None else None
    check_compatible(ck, cfg, tok, resume=True, where=run_dir, overrides=overrides, origin="its config.yaml")
    return cfg


def init_from_config(args, overrides: list[str]) -> tuple[RunConfig, Checkpoint]:
    """A fine-tuning run's config: train.* and data.* from --config (or the defaults) and --set; the architecture
    (every model.* key but dropout) and the tokenizer from the --init-from checkpoint. A --set that contradicts
    the checkpoint is an error."""
    src = read_checkpoint(args.init_from)
    flag = f"--init-from {args.init_from}"
    arch = architecture(src.cfg.model)
    model_sets = set_items(overrides, "model")
    model_items = {item for _, _, item in model_sets}
    cfg = load_config(args.config, [item for item in overrides if item not in model_items])
    if args.config:
        ignored = [f"model.{k}={v}" for k, v in architecture(cfg.model).items()
                   if v != arch[k] and not (k == "vocab_size" and v == 0)]
        if ignored and int(os.environ.get("RANK", "0")) == 0:
            print(f"note: {flag}: the architecture and tokenizer come from the checkpoint; {args.config}'s "
                  f"{', '.join(ignored[:4])}{' ...' if len(ignored) > 4 else ''} are not used")
    raw_model = src.cfg.model.model_dump()  # dropout (not architecture) too, unless --set
    for key, text, _ in model_sets:
        value = parse_scalar(text)
        if not ((key == "vocab_size" and value == 0) or (key in ("n_kv_heads", "hidden_dim") and value is None)):
            raw_model[key] = value  # else "follow the tokenizer" / "derive it": the checkpoint's value
    raw = cfg.model_dump()
    raw["model"] = raw_model
    try:
        cfg = RunConfig.model_validate(raw)
    except ValidationError as e:
        raise UserError(format_validation_error(e, flag, overrides)) from None
    check_compatible(src, cfg, None, resume=False, where=args.init_from, overrides=overrides)
    if args.out:
        cfg.out_dir = args.out
    if args.data:
        cfg.data.source = args.data
    # the run keeps its own copy of the tokenizer: a run directory's checkpoints are replaced as it trains
    cfg.tokenizer.path = str((Path(cfg.out_dir) / "tokenizer" / tokenizer_file_name(src.tokenizer)).resolve())
    cfg.tokenizer.vocab_size = src.tokenizer.vocab_size
    cfg.model.vocab_size = src.tokenizer.vocab_size
    return cfg, src
