"""`tinystories train`: the command. It resolves the run's config (a new run from --config, a resumed run's own,
or a fine-tuning run's from --init-from: resume.py), checks it and the output directory before anything is built
or replaced, then trains (loop.train)."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from tinystories.core.config import RunConfig, load_config
from tinystories.core.errors import UserError
from tinystories.core.runs import checkpoints_dir
from tinystories.data.tokenizer import copy_tokenizer
from tinystories.model.checkpoint import WEIGHTS, Checkpoint, resolve_checkpoint
from tinystories.training.length import require_run_length
from tinystories.training.loop import train
from tinystories.training.resume import init_from_config, resume_config


def _new_config(args, overrides: list[str]) -> RunConfig:
    """A new run's config: --config FILE (or auto: sized for this machine), --set, --out and --data."""
    if not args.config:
        raise UserError("give --config FILE (e.g. configs/cpu.yaml, or auto), --resume RUN_DIR, or "
                        "--init-from CHECKPOINT (fine-tuning)")
    if args.config == "auto" and not Path("auto").exists():
        from tinystories.training.sizing import auto_config

        cfg, why = auto_config(overrides)
        print(f"model size: {why}", flush=True)
    else:
        cfg = load_config(args.config, overrides)
    if args.out:
        cfg.out_dir = args.out
    if args.data:
        cfg.data.source = args.data
    return cfg


def _prepare_out_dir(cfg: RunConfig, args, src: Checkpoint | None) -> None:
    """A new run's directory: not a checkpoint, not holding the --init-from checkpoint, not holding a run unless
    --force (which clears its checkpoints and metrics); a fine-tuning run gets its own copy of the tokenizer."""
    out = Path(cfg.out_dir)
    if (out / WEIGHTS).is_file():
        raise UserError(f"--out {out}: is a checkpoint directory (e.g. an imported model), not a run; choose "
                        f"another --out")
    if src is not None:
        src_dir = resolve_checkpoint(args.init_from).resolve()
        if src_dir == out.resolve() or out.resolve() in src_dir.parents:
            raise UserError(f"--init-from {args.init_from}: lies in the run directory --out {out}, which the "
                            f"new run would replace; give the fine-tuning run another --out")
    if (checkpoints_dir(out) / "latest").exists():
        if not args.force:
            raise UserError(f"{cfg.out_dir} already holds a run: continue it with --resume {cfg.out_dir}, "
                            f"choose another --out, or pass --force to start over")
        shutil.rmtree(checkpoints_dir(out))
        (out / "metrics.jsonl").unlink(missing_ok=True)
    if src is not None:  # the run keeps its own copy of the checkpoint's tokenizer, where its config names it
        Path(cfg.tokenizer.path).parent.mkdir(parents=True, exist_ok=True)
        copy_tokenizer(src.tokenizer, Path(cfg.tokenizer.path).parent)


def _cmd_train(args) -> int:
    overrides = list(args.set or [])
    mb = args.micro_batch
    if mb is not None and mb != "auto" and not (mb.isdigit() and int(mb) >= 1):
        raise UserError(f"--micro-batch {mb!r}: give a whole number of sequences >= 1, or auto")
    src = None
    if args.resume:
        cfg = resume_config(args, overrides)
    elif args.init_from:
        cfg, src = init_from_config(args, overrides)
    else:
        cfg = _new_config(args, overrides)
    require_run_length(cfg)  # before a run directory is cleared or any data built
    if not args.resume:
        _prepare_out_dir(cfg, args, src)
    result = train(cfg, resume=bool(args.resume), init_from=args.init_from, micro_batch=args.micro_batch)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # a torchrun worker whose run is saved and whose process group is gone leaves without interpreter
        # finalization: gloo's threads have aborted it there (SIGABRT, "terminate called without an active
        # exception") after a finished run, about once in a hundred runs, which torchrun reports as a failure
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(result["status"])
    return result["status"]
