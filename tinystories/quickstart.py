"""`tinystories quickstart`: from nothing to a model that writes stories, in one command.

Finds the data (--data, $TINYSTORIES_DATA, a previous download, else the Hub), trains a tokenizer sized for
the data, builds the cache, picks a config for the hardware, trains within a time budget, then prints three
stories, the evaluation table, the loss plot's path and the commands to continue. Every stage reuses its
cached result when rerun; Ctrl-C leaves something usable and says how to continue.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from tinystories.config import CONFIG_DIR
from tinystories.errors import UserError

CLASSIC_OPENINGS = ["Once upon a time", "One day, a little girl named Lily", "Tom and his dog"]


def find_data(data: str | None, data_dir: Path, log=print) -> Path:
    from tinystories.textdata import fetch, list_text_files

    for source, what in ((data, "--data"), (os.environ.get("TINYSTORIES_DATA"), "$TINYSTORIES_DATA")):
        if source:
            if not Path(source).exists():
                raise UserError(f"{what} {source}: no such file or directory (give a TinyStories text file or "
                                f"directory, or leave it unset to download TinyStories from the Hub)")
            files = list_text_files(source, flag=what)
            log(f"data: {source} ({what}; {sum(f.stat().st_size for f in files) / 1e6:.1f} MB in {len(files)} file(s))")
            return Path(source)
    raw = data_dir / "raw"
    if raw.is_dir() and any(raw.iterdir()):
        log(f"data: {raw} (downloaded earlier)")
        return raw
    log("data: downloading TinyStories from the Hugging Face Hub (set TINYSTORIES_DATA or --data to use local files) ...")
    return fetch("v2", data_dir)


def vocab_for(source: Path) -> int:
    """A vocabulary sized for the text: small data cannot fill a large vocabulary (it starves articles)."""
    from tinystories.textdata import list_text_files, split_files

    train, val = split_files(list_text_files(source))
    size = sum(f.stat().st_size for f in (train or val))
    if size < 20e6:
        return 4096
    return 10000


def pick_config(on_gpu: bool) -> Path:
    return CONFIG_DIR / ("tinystories-23M.yaml" if on_gpu else "cpu.yaml")


def _check_same_request(out: Path, cfg) -> None:
    """A run already in --out is reused (or resumed) only when it was made from the same data, vocabulary and
    time budget: `quickstart --minutes 10` after a 1-minute run must not hand back the 1-minute model."""
    from tinystories.config import load_config

    if not (out / "config.yaml").is_file():
        raise UserError(f"{out} holds checkpoints but no config.yaml, so it cannot be checked against this request; "
                        f"delete it, or pass --out to train a new run elsewhere")
    old = load_config(out / "config.yaml")
    wanted = {"data": Path(str(cfg.data.source)).resolve(), "vocabulary": cfg.tokenizer.vocab_size,
              "minutes": cfg.train.max_minutes}
    had = {"data": Path(str(old.data.source)).resolve(), "vocabulary": old.tokenizer.vocab_size,
           "minutes": old.train.max_minutes}
    diff = [k for k in wanted if had[k] != wanted[k]]
    if diff:
        def show(v):
            return "none" if v is None else f"{v:g}" if isinstance(v, float) else str(v)
        said = "; ".join(f"{k} {show(had[k])} (now {show(wanted[k])})" for k in diff)
        suffix = (f"{wanted['minutes']:g}min" if "minutes" in diff else
                  Path(str(cfg.data.source)).stem if "data" in diff else f"v{wanted['vocabulary']}")
        raise UserError(f"{out} holds a run made with other settings: {said}; delete it, "
                        f"or pass --out {out}-{suffix} to train a new one next to it")


def run_quickstart(data: str | None, minutes: float, out: Path, data_dir: Path, stories: int = 3) -> int:
    import torch

    from tinystories.checkpoint import load_model, read_checkpoint
    from tinystories.cli import build_parser
    from tinystories.config import load_config
    from tinystories.evaluate import evaluate, format_result
    from tinystories.plot import plot_run
    from tinystories.sampling import SamplingParams, generate_texts
    from tinystories.train import train

    t_start = time.time()
    source = find_data(data, data_dir)
    on_gpu = torch.cuda.is_available()
    cfg_path = pick_config(on_gpu)
    vocab = vocab_for(source)
    overrides = [f"data.source={source}", f"data.data_dir={data_dir}", f"tokenizer.vocab_size={vocab}",
                 f"train.max_minutes={minutes}", "train.max_steps=null", "train.max_tokens=null", "train.epochs=null"]
    cfg = load_config(cfg_path, overrides)
    cfg.out_dir = str(out)
    print(f"config: {cfg_path.name} ({'GPU' if on_gpu else 'CPU'} found), {vocab}-token tokenizer, {minutes:g} min of training -> {out}")

    latest = out / "checkpoints" / "latest"
    if latest.exists():
        _check_same_request(out, cfg)
        state = read_checkpoint(out, prefer="latest").state
        done = state.get("total_steps") and state["step"] >= state["total_steps"]
        if done:
            print(f"training: reusing the finished run in {out} (step {state['step']}); delete it to train again")
        else:
            print(f"training: resuming the unfinished run in {out} from step {state['step']}")
            if train(load_config(out / "config.yaml"), resume=True)["status"]:
                return _interrupted(out)
    else:
        if train(cfg)["status"]:
            return _interrupted(out)

    model, ck = load_model(out)
    tok = ck.tokenizer
    print("\n" + "=" * 30 + " three stories " + "=" * 30)
    params = SamplingParams(max_new_tokens=200, temperature=0.8, top_k=50, top_p=0.95, seed=42)
    for opening in CLASSIC_OPENINGS[:stories]:
        text = generate_texts(model, tok, opening, params)[0]["text"]
        print(f"\n{text}\n")
    print("=" * 30 + " evaluation " + "=" * 33)
    args = build_parser().parse_args(["eval", "--checkpoint", str(out), "--num-stories", "12", "--max-new-tokens", "200",
                                      "--device", "cpu" if not on_gpu else "auto"])
    result = evaluate(args, log=lambda *a, **k: None)
    print(format_result(result))
    plot = plot_run(out)
    print(f"\nloss plot: {plot}")
    print(f"total time: {(time.time() - t_start) / 60:.1f} min")
    print("\ncontinue with:")
    print(f"  tinystories generate --checkpoint {out} --prompt \"Once upon a time\"")
    print(f"  tinystories serve --checkpoint {out}            # playground at http://127.0.0.1:8000")
    steps = int(ck.state.get("total_steps") or ck.step or 1000)
    print(f"  tinystories train --resume {out} --set train.max_steps={3 * steps}   # train 3x longer (the cosine is stretched)")
    print(f"  tinystories doctor {out}")
    return 0


def _interrupted(out: Path) -> int:
    print(f"\ninterrupted. What is there is usable: tinystories generate --checkpoint {out}; "
          f"rerun `tinystories quickstart --out {out}` (or make quickstart) to finish training.")
    return 130


def _cmd_quickstart(args) -> int:
    if args.minutes is None:
        args.minutes = float(os.environ.get("QUICKSTART_MINUTES", 10))
    if args.minutes <= 0:
        raise UserError(f"--minutes {args.minutes}: must be positive")
    try:
        return run_quickstart(args.data, args.minutes, Path(args.out), Path(args.data_dir))
    except KeyboardInterrupt:
        return _interrupted(Path(args.out))


def register_cli(sub) -> None:
    from tinystories.cli import add_command

    p = add_command(sub, "quickstart", "the main job: data -> tokenizer -> cache -> train -> stories and an eval report",
                    "  tinystories quickstart                                   # download, 10 minutes on CPU\n"
                    "  tinystories quickstart --data ../shared/data/tinystories --minutes 5\n"
                    "  TINYSTORIES_DATA=../shared/data/tinystories QUICKSTART_MINUTES=10 make quickstart\n",
                    _cmd_quickstart)
    p.add_argument("--data", help="raw text file or directory (default: $TINYSTORIES_DATA, a previous download, else the Hub)")
    p.add_argument("--minutes", type=float, default=None, help="training budget in minutes (default $QUICKSTART_MINUTES or 10)")
    p.add_argument("--out", default="runs/quickstart", help="run directory (default runs/quickstart)")
    p.add_argument("--data-dir", default="data", help="where downloads, tokenizers and caches go (default data)")
