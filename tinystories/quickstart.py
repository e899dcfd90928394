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

from tinystories.core.defaults import BYTES_PER_TOKEN, QUICKSTART_OPENINGS
from tinystories.core.errors import UserError
from tinystories.core.fmt import fmt_approx
from tinystories.core.runs import checkpoints_dir
from tinystories.training.sizing import pick_config

EVAL_TOKENS = 262_144  # validation tokens the report scores (all of a small validation text; bounded for 22 MB)
EVAL_STORIES = 12  # generated for the story statistics
# rough speeds for the plan, per CPU core, measured on a shared 2-core AMD EPYC (benchmarks/full_scale.py)
CPU_TOKENS_PER_S = 10_000  # training tokens/s a CPU run buys at most (cpu.yaml: 7K measured): sizes the cache
CACHE_PASSES = 3  # the cache part holds 3x the tokens the budget buys at that speed
TOKENIZE_MB_S_PER_CORE = 3.0  # data prepare
BPE_TRAIN_MB_S = 3.0  # tokenizer train
REPORT_S_CPU = 45  # three stories, 12 for statistics, likelihood on EVAL_TOKENS, grammar, plot (15-32 s measured)
STORY_BYTES = 900  # TinyStoriesV2's mean story size, for the tokenizer sample's size


def cache_tokens_for(minutes: float, on_gpu: bool) -> int | None:
    """The train tokens a `minutes` run can use, as a part of the cache to build (None: the whole cache)."""
    if on_gpu:
        return None
    return int(CACHE_PASSES * CPU_TOKENS_PER_S * 60 * minutes)


def find_data(data: str | None, data_dir: Path, log=print) -> Path:
    from tinystories.data.text import fetch, list_text_files

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
    log("data: downloading TinyStories from the Hugging Face Hub "
        "(set TINYSTORIES_DATA or --data to use local files) ...")
    return fetch("v2", data_dir)


def vocab_for(source: Path) -> int:
    """A vocabulary sized for the text: small data cannot fill a large vocabulary (it starves articles)."""
    from tinystories.data.text import list_text_files, split_files

    train, val = split_files(list_text_files(source))
    size = sum(f.stat().st_size for f in (train or val))
    if size < 20e6:
        return 4096
    return 10000


def _check_same_request(out: Path, cfg) -> None:
    """A run already in --out is reused (or resumed) only when it was made from the same data, vocabulary and
    time budget: `quickstart --minutes 10` after a 1-minute run must not hand back the 1-minute model."""
    from tinystories.core.config import load_config

    if not (out / "config.yaml").is_file():
        raise UserError(f"{out} holds checkpoints but no config.yaml, so it cannot be checked against this request; "
                        f"delete it, or pass --out to train a new run elsewhere")
    old = load_config(out / "config.yaml")
    wanted = {"data": Path(str(cfg.data.source)).resolve(), "vocabulary": cfg.tokenizer.vocab_size,
              "minutes": cfg.train.max_minutes, "format": cfg.data.format}
    had = {"data": Path(str(old.data.source)).resolve(), "vocabulary": old.tokenizer.vocab_size,
           "minutes": old.train.max_minutes, "format": old.data.format}
    diff = [k for k in wanted if had[k] != wanted[k]]
    if diff:
        def show(v):
            return "none" if v is None else f"{v:g}" if isinstance(v, float) else str(v)
        said = "; ".join(f"{k} {show(had[k])} (now {show(wanted[k])})" for k in diff)
        suffix = (f"{wanted['minutes']:g}min" if "minutes" in diff else wanted["format"] if "format" in diff else
                  Path(str(cfg.data.source)).stem if "data" in diff else f"v{wanted['vocabulary']}")
        raise UserError(f"{out} holds a run made with other settings: {said}; delete it, "
                        f"or pass --out {out}-{suffix} to train a new one next to it")


def run_quickstart(data: str | None, minutes: float, out: Path, data_dir: Path, stories: int = 3,
                   fmt: str = "plain") -> int:
    import torch

    from tinystories.data.prepare import ensure_cache, ensure_tokenizer, run_tokenizer_dir

    t_start = time.time()
    stages: list[tuple[str, float]] = []
    source = find_data(data, data_dir)
    stages.append(("data", time.time() - t_start))
    on_gpu = torch.cuda.is_available()
    cfg = quickstart_config(source, minutes, out, data_dir, on_gpu, fmt)
    latest = checkpoints_dir(out) / "latest"
    if latest.exists():
        _check_same_request(out, cfg)  # before any tokenizer or cache is built
    print_plan(cfg, source, minutes, on_gpu, out)

    t0 = time.time()
    tok = ensure_tokenizer(cfg, source)
    stages.append(("tokenizer", time.time() - t0))
    t0 = time.time()
    cache = ensure_cache(cfg, tok, source)
    stages.append(("token cache", time.time() - t0))
    if not cfg.tokenizer.path:
        cfg.tokenizer.path = str(run_tokenizer_dir(cfg))  # train finds both ready (one "cache hit" line)
    if not on_gpu and not latest.exists():  # a new run: sized to this CPU, the budget and the data it holds
        cfg = size_for_cpu(cfg, minutes, tok.vocab_size, int(cache.manifest["splits"]["train"]["tokens"]))
    t0 = time.time()
    if _train_or_reuse(cfg, out, latest.exists()):
        return _interrupted(out)
    stages.append(("training", time.time() - t0))
    t0 = time.time()
    ck = print_report(out, stories, on_gpu)
    stages.append(("stories + report", time.time() - t0))
    print("time per stage: " + ", ".join(f"{name} {fmt_approx(secs)}" for name, secs in stages))
    print(f"total time: {(time.time() - t_start) / 60:.1f} min")
    print("\ncontinue with:")
    print(f"  tinystories generate --checkpoint {out} --prompt \"Once upon a time\"")
    if fmt == "instruct":
        print(f"  tinystories generate --checkpoint {out} --words dragon,cookie,brave --features dialogue   "
              "# a story on request (docs/instruct.md)")
    print(f"  tinystories serve --checkpoint {out}            # playground at http://127.0.0.1:8000")
    steps = int(ck.state.get("total_steps") or ck.step or 1000)
    print(f"  tinystories train --resume {out} --set train.max_steps={3 * steps}   "
          "# train 3x longer (the cosine is stretched)")
    print(f"  tinystories doctor {out}")
    return 0


def quickstart_overrides(source, minutes: float, data_dir, vocab: int, cache_tokens: int | None,
                         fmt: str = "plain") -> list[str]:
    """What the quickstart sets on top of the shipped config: the data and its format, the tokenizer's size, the
    time budget and the part of the cache it can use."""
    return [f"data.source={source}", f"data.data_dir={data_dir}", f"tokenizer.vocab_size={vocab}",
            f"train.max_minutes={minutes}", "train.max_steps=null", "train.max_tokens=null", "train.epochs=null",
            f"data.cache_tokens={'null' if cache_tokens is None else cache_tokens}", f"data.format={fmt}"]


def quickstart_config(source: Path, minutes: float, out: Path, data_dir: Path, on_gpu: bool, fmt: str = "plain"):
    """The run's config: the GPU config or cpu.yaml (sized later, once the cache says how much text there is:
    size_for_cpu), with a tokenizer sized for the data, a time budget, a cache part the budget can use. Printed."""
    from tinystories.core.config import load_config

    cfg_path = pick_config(on_gpu)
    vocab = vocab_for(source)
    overrides = quickstart_overrides(source, minutes, data_dir, vocab, cache_tokens_for(minutes, on_gpu), fmt)
    cfg = load_config(cfg_path, overrides)
    cfg.out_dir = str(out)
    print(f"config: {cfg_path.name} ({'GPU' if on_gpu else 'CPU'} found), {vocab}-token tokenizer, {minutes:g} min "
          f"of training -> {out}")
    return cfg


def size_for_cpu(cfg, minutes: float, vocab: int, data_tokens: int):
    """cpu.yaml's run sized to this CPU (each shape's training speed, measured once per machine), the budget and
    the `data_tokens` the cache holds (sizing.py, from the recipe study). Prints the `model size:` line."""
    from tinystories.training.sizing import pick_config, sized_cpu_config

    overrides = quickstart_overrides(cfg.data.source, minutes, cfg.data.data_dir, vocab, cfg.data.cache_tokens,
                                     cfg.data.format)
    sized, why = sized_cpu_config(pick_config(False), overrides + [f"tokenizer.path={cfg.tokenizer.path}"], minutes,
                                  vocab, data_tokens)
    sized.out_dir = cfg.out_dir
    print(f"model size: {why}")
    return sized


def _train_or_reuse(cfg, out: Path, has_run: bool) -> int:
    """Train the run, resume an unfinished one in `out`, or reuse a finished one. Returns train's status (0: done,
    else interrupted)."""
    from tinystories.core.config import load_config
    from tinystories.model.checkpoint import read_checkpoint
    from tinystories.training.loop import train

    if not has_run:
        return train(cfg)["status"]
    state = read_checkpoint(out, prefer="latest").state
    if state.get("total_steps") and state["step"] >= state["total_steps"]:
        print(f"training: reusing the finished run in {out} (step {state['step']}); delete it to train again")
        return 0
    print(f"training: resuming the unfinished run in {out} from step {state['step']}")
    return train(load_config(out / "config.yaml"), resume=True)["status"]


def selection_tokens(ck) -> int:
    """How much of the validation split the report leaves out: the tokens the run's evaluations scored, which chose
    its best checkpoint (train.eval_tokens), when at least as much text is left after them; else none."""
    from tinystories.evaluation.stories import open_run_cache

    cache, n = open_run_cache(ck.state), ck.cfg.train.eval_tokens or 0
    return n if cache is not None and n and cache.split("val").tokens >= 2 * n else 0


def print_report(out: Path, stories: int, on_gpu: bool):
    """Three stories from the classic openings, the evaluation table (held-out prompts, grammar errors) and the loss
    plot. Returns the checkpoint."""
    from tinystories.evaluation.evaluate import evaluate, format_result
    from tinystories.evaluation.plot import plot_run
    from tinystories.inference.sampling import SamplingParams, generate_texts
    from tinystories.model.checkpoint import load_model

    model, ck = load_model(out)
    print("\n" + "=" * 30 + " three stories " + "=" * 30)
    params = SamplingParams(max_new_tokens=200, seed=42)  # the other settings: the sampling defaults
    for opening in QUICKSTART_OPENINGS[:stories]:
        text = generate_texts(model, ck.tokenizer, opening, params)[0]["text"]
        print(f"\n{text}\n")
    print("=" * 30 + " evaluation " + "=" * 33)
    skip = selection_tokens(ck)
    result = evaluate(out, num_stories=EVAL_STORIES, sampling=SamplingParams(max_new_tokens=200),
                      max_tokens=EVAL_TOKENS, device="cpu" if not on_gpu else "auto", prompts="held-out",
                      log=lambda *a, **k: None, skip_tokens=skip)
    print(format_result(result, show_grammar_errors=3))
    if not skip:
        print(f"(the validation split is short: the scores include the {ck.cfg.train.eval_tokens:,} tokens that "
              f"chose the best checkpoint)")
    plot = plot_run(out)
    print(f"\nloss plot: {plot}")
    return ck


def print_plan(cfg, source: Path, minutes: float, on_gpu: bool, out: Path) -> None:
    """What the quickstart will do, with rough times for this machine, before it does it."""
    import json

    from tinystories.data.cache import PART_VAL_BYTES, default_workers
    from tinystories.data.prepare import cache_root, full_cache_command, run_tokenizer_dir
    from tinystories.data.text import list_text_files, split_files

    files = list_text_files(source)
    train, val = split_files(files)
    train_b = sum(f.stat().st_size for f in (train or val))
    val_b = sum(f.stat().st_size for f in val) if train else 0
    cores = default_workers()
    tok_dir = run_tokenizer_dir(cfg)
    n = cfg.tokenizer.max_stories
    sample_b = train_b if n is None else min(train_b, n * STORY_BYTES)
    if (tok_dir / "tokenizer.json").is_file():
        tok_line = f"reuse {tok_dir}"
    else:
        what = ("every story" if n is None else f"all stories (at most {n:,}: tokenizer.max_stories)"
                if sample_b >= train_b else f"the first {n:,} stories (tokenizer.max_stories)")
        tok_line = f"train a {cfg.tokenizer.vocab_size}-token BPE on {what}, ~{sample_b / 1e6:,.0f} MB, " \
                   f"~{fmt_approx(sample_b / 1e6 / BPE_TRAIN_MB_S)}"
    want = cfg.data.cache_tokens
    part_b = train_b if want is None else min(train_b, want * BYTES_PER_TOKEN)
    caches = [json.loads(m.read_text()) for m in cache_root(cfg.data.data_dir).glob("*/manifest.json")]
    reuse = any(m["tokenizer"]["path"] == str((tok_dir / "tokenizer.json").resolve()) and (
        m.get("part") is None or (want is not None and m["splits"]["train"]["tokens"] >= want)) for m in caches)
    if want is None or part_b >= train_b:
        secs = (train_b + val_b) / 1e6 / (TOKENIZE_MB_S_PER_CORE * cores)
        cache_line = f"tokenize all {(train_b + val_b) / 1e6:,.0f} MB of text"
    else:
        val_part = min(val_b, PART_VAL_BYTES)
        secs = (part_b + val_part) / 1e6 / (TOKENIZE_MB_S_PER_CORE * cores)
        cache_line = (f"tokenize a part: the first ~{part_b / 1e6:,.0f} MB of the {train_b / 1e6:,.0f} MB train text "
                      f"(>= {want:,} tokens, {CACHE_PASSES}x what {minutes:g} min can use) + the first "
                      f"{val_part / 1e6:,.1f} MB of the {val_b / 1e6:,.1f} MB validation text")
    cache_line = "reuse the token cache" if reuse else f"{cache_line}, {cores} worker(s), ~{fmt_approx(secs)}"
    print("plan (rough times for this machine):")
    print(f"  data       {source}: {(train_b + val_b) / 1e6:,.1f} MB in {len(files)} file(s)")
    print(f"  tokenizer  {tok_line}")
    print(f"  cache      {cache_line}")
    if want is not None and not reuse and part_b < train_b:
        print(f"             the whole cache, for longer runs: "
              f"{full_cache_command(cfg, tok_dir / 'tokenizer.json', source)}")
    print(f"  training   {minutes:g} min (time budget; {cfg.train.eval_tokens:,} validation tokens at each eval) "
          f"-> {out}")
    print(f"  report     3 stories, {EVAL_STORIES} more for statistics, loss on up to {EVAL_TOKENS:,} validation "
          f"tokens after the {cfg.train.eval_tokens:,} that choose the best checkpoint"
          + ("" if on_gpu else f", ~{fmt_approx(REPORT_S_CPU)}"))


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
        return run_quickstart(args.data, args.minutes, Path(args.out), Path(args.data_dir),
                              fmt="instruct" if args.instruct else "plain")
    except KeyboardInterrupt:
        return _interrupted(Path(args.out))
