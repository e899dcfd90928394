"""Data and tokenizer stages: `data fetch`, `data prepare`, `tokenizer train`, `tokenizer report`, and
`ensure_run_data`, which gives `train` and `quickstart` a tokenizer and a cache, building what is missing."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from tinystories.core.config import RunConfig
from tinystories.core.defaults import REPORT_STORIES
from tinystories.core.errors import UserError
from tinystories.core.fmt import fmt_clock

DEFAULT_TOKENIZER_DIR = "tokenizer"  # under the data directory


def cache_root(data_dir: str | Path) -> Path:
    return Path(data_dir) / "cache"


def held_out_docs(source: Path, n: int) -> list[str]:
    """Stories for the tokenizer report: the official validation file when present, else the last train ones.

    A file with one paragraph per line (no story markers) is read one line per story here."""
    from tinystories.data.text import is_line_per_story, iter_documents, list_text_files, split_files

    train, val = split_files(list_text_files(source))
    docs: list[str] = []
    for d in iter_documents(val or train):
        docs.extend([line for line in d.splitlines() if line.strip()] if is_line_per_story(d) else [d])
        if len(docs) >= 4 * n and val:
            break
    return docs[:n] if val else docs[-n:]


def train_tokenizer(source: Path, vocab_size: int, out_dir: Path, max_stories: int | None) -> Path:
    from tinystories.core.atomic import ensure_writable_dir
    from tinystories.data.text import iter_documents, list_text_files, split_files
    from tinystories.data.tokenizer import train_bpe

    files = list_text_files(source)
    train_files, val_files = split_files(files)
    ensure_writable_dir(out_dir, "tokenizer output")
    return train_bpe(iter_documents(train_files or val_files, max_stories), vocab_size, out_dir,
                     sample={"source": str(source), "max_stories": max_stories})


def sample_note(max_stories: int | None, setting: str) -> str:
    """How much text a tokenizer is trained on, and the setting that changes it."""
    if max_stories is None:
        return f"every story: {setting}"
    return f"the first {max_stories:,} stories at most: {setting}"


class Progress:
    """A progress line for long stages: amount done, rate and ETA (MB by default; unit="tokens", scale=1 for
    tokens). On a terminal it redraws one line on stderr; in a log (not a terminal) it writes a line every 10% or
    30 s, so a long stage is never silent."""

    def __init__(self, label: str, log=print, stream=None, unit: str = "MB", scale: float = 1e6):
        self.label, self.log, self.t0 = label, log, time.time()
        self.unit, self.scale = unit, scale
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.last_t, self.last_frac, self.drawn = 0.0, 0.0, False

    def __call__(self, done: float, total: float) -> None:
        now = time.time()
        frac = done / total if total else 1.0
        if self.tty and now - self.last_t < 0.5 and done < total:
            return
        if not self.tty and done < total and frac - self.last_frac < 0.1 and now - self.last_t < 30:
            return
        self.last_t, self.last_frac = now, frac
        rate = done / max(now - self.t0, 1e-9)
        eta = (total - done) / rate if rate > 0 else 0
        u, k = self.unit, self.scale
        line = (f"  {self.label}: {done / k:,.0f}/{total / k:,.0f} {u} ({frac:.0%}), "
                f"{rate / k:,.{1 if k > 1 else 0}f} {u}/s, ETA {fmt_clock(eta)}")
        if self.tty:
            print(f"\r{line}\033[K", end="", file=self.stream, flush=True)
            self.drawn = True
        else:
            self.log(line)

    def close(self) -> None:
        if self.drawn:
            print(file=self.stream, flush=True)
            self.drawn = False


def full_cache_command(cfg: RunConfig, tok_path: Path, source: Path) -> str:
    return f"tinystories data prepare --tokenizer {tok_path} --from {source} --data-dir {cfg.data.data_dir}"


def ensure_run_data(cfg: RunConfig, log=print):
    """The tokenizer and token cache a run needs, trained/built when missing. Returns (tokenizer, cache)."""
    source = run_source(cfg)
    tok = ensure_tokenizer(cfg, source, log)
    return tok, ensure_cache(cfg, tok, source, log)


def run_source(cfg: RunConfig) -> Path:
    from tinystories.data.text import list_text_files, resolve_source

    # `train` and `quickstart` name the raw text with --data (or the config's data.source)
    source = resolve_source(cfg.data.source, cfg.data.data_dir, flag="--data")
    list_text_files(source, flag="--data")
    return source


def run_tokenizer_dir(cfg: RunConfig) -> Path:
    """Where a run's tokenizer is trained when tokenizer.path is not set."""
    return Path(cfg.data.data_dir) / f"{DEFAULT_TOKENIZER_DIR}-{cfg.tokenizer.vocab_size}"


def ensure_tokenizer(cfg: RunConfig, source: Path, log=print):
    from tinystories.data.tokenizer import describe_sample, load_tokenizer, training_sample

    if cfg.tokenizer.path:
        return load_tokenizer(cfg.tokenizer.path)
    tok_dir = run_tokenizer_dir(cfg)
    if not (tok_dir / "tokenizer.json").is_file():
        log(f"training a {cfg.tokenizer.vocab_size}-token BPE tokenizer on {source} "
            f"({sample_note(cfg.tokenizer.max_stories, 'tokenizer.max_stories=N or null changes it')}) ...")
        t0 = time.time()
        train_tokenizer(source, cfg.tokenizer.vocab_size, tok_dir, cfg.tokenizer.max_stories)
        tok = load_tokenizer(tok_dir)
        log(f"  done in {time.time() - t0:.1f}s -> {tok_dir / 'tokenizer.json'} "
            f"(trained on {describe_sample(training_sample(tok))})")
        return tok
    tok = load_tokenizer(tok_dir)
    log(f"tokenizer {tok_dir / 'tokenizer.json'} (trained on {describe_sample(training_sample(tok))})")
    return tok


def ensure_cache(cfg: RunConfig, tok, source: Path, log=print):
    from tinystories.data.cache import TokenCache, prepare

    t0 = time.time()
    bar = Progress("token cache", log)
    path, hit = prepare(tok, source, cache_root(cfg.data.data_dir), cfg.data.val_fraction, cfg.data.max_stories,
                        progress=bar, train_tokens=cfg.data.cache_tokens, fmt=cfg.data.format)
    bar.close()
    cache = TokenCache.open(path)
    sp = cache.manifest["splits"]
    log(f"token cache {path} ({'cache hit' if hit else f'built in {time.time() - t0:.1f}s'}): "
        f"train {sp['train']['tokens']:,} tokens, val {sp['val']['tokens']:,} tokens")
    part = cache.manifest.get("part")
    if part:
        log(f"  a part of the cache: the first {part['units']} of {part['of']} units of the train text "
            f"(data.cache_tokens={cfg.data.cache_tokens}: what this run can use); the whole cache, for longer runs: "
            f"{full_cache_command(cfg, tok.path, source)}")
    note = empty_val_note(cache.manifest, source, "data.val_fraction=")
    if note:
        log(note)
    return cache


def empty_val_note(manifest: dict, source: Path, setting: str) -> str | None:
    """One line when a cache has no held-out text: training then validates on its train split (the loop's
    validation_subset), so "val loss" is a train loss. `setting` names the knob: "data.val_fraction=" or
    "--val-fraction "."""
    if manifest["splits"]["val"]["tokens"] >= 2:
        return None
    fraction = manifest.get("val_fraction") or 0
    if any(s.get("split") == "val" for s in manifest.get("sources", [])):
        why = f"the validation file(s) in {source} hold no text"
    elif not fraction:
        why = f"{setting}{fraction:g} and {source} has no validation file"
    else:
        why = (f"{setting}{fraction:g} held out none of the {manifest['splits']['train']['documents']:,} stories "
               f"(it holds out 1 story in {max(2, round(1 / fraction))})")
    return (f"note: the validation split is empty ({why}): training validates on the train split, so its "
            f"val loss measures memorisation, not generalisation")


def _check_count(flag: str, value: int | None) -> None:
    if value is not None and value < 1:
        raise UserError(f"{flag} {value}: must be >= 1 (leave it out to use every story)")


# -------------------------------------------------------------------------------------------------- CLI


def _cmd_fetch(args) -> int:
    from tinystories.data.text import fetch

    raw = fetch(args.version, args.data_dir, args.source)
    files = sorted(p.name for p in raw.iterdir() if not p.name.startswith("."))
    print(f"raw text in {raw}: {', '.join(files)}")
    print(f"next: tinystories tokenizer train --data-dir {args.data_dir} "
          f"--out {Path(args.data_dir) / DEFAULT_TOKENIZER_DIR}")
    return 0


def _source(args) -> Path:
    from tinystories.data.text import resolve_source

    return resolve_source(args.source, args.data_dir)


def _cmd_tokenizer_train(args) -> int:
    from tinystories.data.tokenizer import format_report, load_tokenizer, report

    _check_count("--max-stories", args.max_stories)
    source = _source(args)
    out = Path(args.out)
    if (out / "tokenizer.json").is_file() and not args.force:
        raise UserError(f"{out / 'tokenizer.json'} already exists (token caches and runs may be built on it): "
                        f"choose another --out, or pass --force to replace it")
    t0 = time.time()
    print(f"training on {source}: {sample_note(args.max_stories, '--max-stories N or all changes it')} ...", flush=True)
    path = train_tokenizer(source, args.vocab_size, out, args.max_stories)
    tok = load_tokenizer(path)
    print(f"trained {tok.vocab_size:,}-token byte-level BPE on {source} in {time.time() - t0:.1f}s -> {path}")
    if tok.vocab_size < args.vocab_size:
        print(f"note: the text has too few distinct merges for {args.vocab_size:,} tokens; "
              f"the vocabulary stopped at {tok.vocab_size:,}")
    print(format_report(report(tok, held_out_docs(source, REPORT_STORIES))))
    return 0


def _cmd_tokenizer_report(args) -> int:
    from tinystories.core.args import check_report_path, write_json_report
    from tinystories.data.tokenizer import format_report, format_reports_side_by_side, load_tokenizer, report

    if args.stories < 1:
        raise UserError(f"--stories {args.stories}: must be >= 1 "
                        f"(held-out stories to measure; default {REPORT_STORIES})")
    if args.json:
        check_report_path(args.json)
    reps = [report(load_tokenizer(t), held_out_docs(_source(args), args.stories)) for t in args.tokenizer]
    if args.json:
        write_json_report(args.json, reps)
    if len(reps) > 1:
        print(format_reports_side_by_side(reps))
    else:
        print(format_report(reps[0]))
    return 0


def _cmd_prepare(args) -> int:
    from tinystories.data.cache import TokenCache, default_workers, prepare
    from tinystories.data.tokenizer import load_tokenizer

    if not 0 <= args.val_fraction < 1:
        raise UserError(f"--val-fraction {args.val_fraction:g}: must be in [0, 1), e.g. 0.01 (0 = hold out nothing)")
    _check_count("--max-stories", args.max_stories)
    tok = load_tokenizer(args.tokenizer)
    source = _source(args)
    if args.workers is not None and args.workers < 1:
        raise UserError(f"--workers {args.workers}: must be >= 1 (default: one per CPU core, {default_workers()})")
    _check_count("--tokens", args.tokens)
    t0 = time.time()
    bar = Progress("tokenizing", lambda line: print(line, flush=True))
    path, hit = prepare(tok, source, cache_root(args.data_dir) if args.cache_dir is None else Path(args.cache_dir),
                        args.val_fraction, args.max_stories, bar, train_tokens=args.tokens, workers=args.workers,
                        fmt=args.format)
    bar.close()
    m = TokenCache.open(path).manifest
    secs = time.time() - t0
    size = sum(s["bytes"] for s in m["splits"].values())
    workers = args.workers or default_workers()
    speed = "" if hit else f" ({size / 1e6 / max(secs, 1e-9):.1f} MB/s of text, {workers} worker(s))"
    print(f"{'cache hit' if hit else f'built in {secs:.1f}s'}: {path}{speed}")
    if m.get("part"):
        part = m["part"]
        print(f"  a part of the cache: the first {part['units']} of {part['of']} units of the train text "
              f"(--tokens {args.tokens or part['train_tokens_wanted']}); without --tokens the rerun adds the rest")
    for split, s in m["splits"].items():
        print(f"  {split:5} {s['documents']:>9,} stories {s['tokens']:>13,} tokens {s['bytes']:>14,} bytes "
              f"({s['bytes'] / max(s['tokens'], 1):.2f} bytes/token)")
    print(f"  tokenizer {m['tokenizer']['path']} (sha256 {m['tokenizer']['sha256'][:12]}), dtype {m['dtype']}")
    note = empty_val_note(m, source, "--val-fraction ")
    if note:
        print(note)
    return 0


def _cmd_verify(args) -> int:
    from tinystories.data.cache import FORMAT_VERSION
    from tinystories.data.integrity import REBUILD, cache_files, cache_problems, read_manifest, tokenizer_problem

    root = cache_root(args.data_dir) if args.cache is None else Path(args.cache)
    caches = [root] if (root / "manifest.json").is_file() else sorted(p.parent for p in root.glob("*/manifest.json"))
    if not caches:
        raise UserError(f"{root}: no token cache here (no manifest.json in it or its subdirectories); pass --cache "
                        f"DIR, or build one with `tinystories data prepare`")
    damaged = 0
    for cache in caches:
        t0 = time.time()
        try:
            manifest = read_manifest(cache, FORMAT_VERSION)
        except UserError as e:
            print(f"DAMAGED {e}")
            damaged += 1
            continue
        problems = cache_problems(cache, manifest, full=True)
        problems += [p for p in [tokenizer_problem(manifest)] if p]
        for p in problems:
            print(f"DAMAGED {p}")
        damaged += len(problems)
        files = cache_files(manifest)
        size = sum(rec["size"] for _, rec in files)
        print(f"{'ok' if not problems else 'damaged'}: {cache} ({len(files)} files, {size / 1e6:,.1f} MB, every byte "
              f"checked against the manifest's SHA-256 in {time.time() - t0:.1f}s)")
    if damaged:
        raise UserError(f"{damaged} damaged file(s) listed above: for each, {REBUILD}")
    return 0
