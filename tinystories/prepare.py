"""Data and tokenizer stages: `data fetch`, `data prepare`, `tokenizer train`, `tokenizer report`, and
`ensure_run_data`, which gives `train` and `quickstart` a tokenizer and a cache, building what is missing."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from tinystories.config import RunConfig
from tinystories.errors import UserError

DEFAULT_TOKENIZER_DIR = "tokenizer"  # under the data directory
REPORT_STORIES = 2000


def cache_root(data_dir: str | Path) -> Path:
    return Path(data_dir) / "cache"


def held_out_docs(source: Path, n: int) -> list[str]:
    """Stories for the tokenizer report: the official validation file when present, else the last train ones.

    A file with one paragraph per line (no story markers) is read one line per story here."""
    from tinystories.textdata import iter_documents, list_text_files, split_files

    train, val = split_files(list_text_files(source))
    docs: list[str] = []
    for d in iter_documents(val or train):
        docs.extend([line for line in d.splitlines() if line.strip()] if "\n" in d and len(d) > 20000 else [d])
        if len(docs) >= 4 * n and val:
            break
    return docs[:n] if val else docs[-n:]


def train_tokenizer(source: Path, vocab_size: int, out_dir: Path, max_stories: int | None) -> Path:
    from tinystories.textdata import ensure_writable_dir, iter_documents, list_text_files, split_files
    from tinystories.tokenizer import train_bpe

    files = list_text_files(source)
    train_files, val_files = split_files(files)
    ensure_writable_dir(out_dir, "tokenizer output")
    return train_bpe(iter_documents(train_files or val_files, max_stories), vocab_size, out_dir)


def ensure_run_data(cfg: RunConfig, log=print):
    """The tokenizer and token cache a run needs, trained/built when missing. Returns (tokenizer, cache)."""
    from tinystories.cache import TokenCache, prepare
    from tinystories.textdata import list_text_files, resolve_source
    from tinystories.tokenizer import load_tokenizer

    # `train` and `quickstart` name the raw text with --data (or the config's data.source)
    source = resolve_source(cfg.data.source, cfg.data.data_dir, flag="--data")
    list_text_files(source, flag="--data")
    if cfg.tokenizer.path:
        tok = load_tokenizer(cfg.tokenizer.path)
    else:
        tok_dir = Path(cfg.data.data_dir) / f"{DEFAULT_TOKENIZER_DIR}-{cfg.tokenizer.vocab_size}"
        if not (tok_dir / "tokenizer.json").is_file():
            log(f"training a {cfg.tokenizer.vocab_size}-token BPE tokenizer on {source} ...")
            t0 = time.time()
            train_tokenizer(source, cfg.tokenizer.vocab_size, tok_dir, cfg.tokenizer.max_stories)
            log(f"  done in {time.time() - t0:.1f}s -> {tok_dir / 'tokenizer.json'}")
        tok = load_tokenizer(tok_dir)
    t0 = time.time()
    path, hit = prepare(tok, source, cache_root(cfg.data.data_dir), cfg.data.val_fraction, cfg.data.max_stories)
    cache = TokenCache.open(path)
    sp = cache.manifest["splits"]
    log(f"token cache {path} ({'cache hit' if hit else f'built in {time.time() - t0:.1f}s'}): "
        f"train {sp['train']['tokens']:,} tokens, val {sp['val']['tokens']:,} tokens")
    note = empty_val_note(cache.manifest, source, "data.val_fraction=")
    if note:
        log(note)
    return tok, cache


def empty_val_note(manifest: dict, source: Path, setting: str) -> str | None:
    """One line when a cache has no held-out text: training then validates on its train split (train.py's
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
    from tinystories.textdata import fetch

    raw = fetch(args.version, args.data_dir, args.source)
    files = sorted(p.name for p in raw.iterdir() if not p.name.startswith("."))
    print(f"raw text in {raw}: {', '.join(files)}")
    print(f"next: tinystories tokenizer train --data-dir {args.data_dir} --out {Path(args.data_dir) / DEFAULT_TOKENIZER_DIR}")
    return 0


def _source(args) -> Path:
    from tinystories.textdata import resolve_source

    return resolve_source(args.source, args.data_dir)


def _cmd_tokenizer_train(args) -> int:
    from tinystories.tokenizer import format_report, load_tokenizer, report

    _check_count("--max-stories", args.max_stories)
    source = _source(args)
    out = Path(args.out)
    if (out / "tokenizer.json").is_file() and not args.force:
        raise UserError(f"{out / 'tokenizer.json'} already exists (token caches and runs may be built on it): "
                        f"choose another --out, or pass --force to replace it")
    t0 = time.time()
    path = train_tokenizer(source, args.vocab_size, out, args.max_stories)
    tok = load_tokenizer(path)
    print(f"trained {tok.vocab_size:,}-token byte-level BPE on {source} in {time.time() - t0:.1f}s -> {path}")
    if tok.vocab_size < args.vocab_size:
        print(f"note: the text has too few distinct merges for {args.vocab_size:,} tokens; the vocabulary stopped at {tok.vocab_size:,}")
    print(format_report(report(tok, held_out_docs(source, REPORT_STORIES))))
    return 0


def _cmd_tokenizer_report(args) -> int:
    from tinystories.cli import check_report_path, write_json_report
    from tinystories.tokenizer import format_report, format_reports_side_by_side, load_tokenizer, report

    if args.stories < 1:
        raise UserError(f"--stories {args.stories}: must be >= 1 (held-out stories to measure; default {REPORT_STORIES})")
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
    from tinystories.cache import TokenCache, prepare
    from tinystories.tokenizer import load_tokenizer

    if not 0 <= args.val_fraction < 1:
        raise UserError(f"--val-fraction {args.val_fraction:g}: must be in [0, 1), e.g. 0.01 (0 = hold out nothing)")
    _check_count("--max-stories", args.max_stories)
    tok = load_tokenizer(args.tokenizer)
    source = _source(args)
    t0 = time.time()
    last = [0.0]

    def progress(split, tokens, _n):
        if sys.stderr.isatty() and time.time() - last[0] > 0.5:
            last[0] = time.time()
            print(f"\r  {split}: {tokens:,} tokens", end="", file=sys.stderr)

    path, hit = prepare(tok, source, cache_root(args.data_dir) if args.cache_dir is None else Path(args.cache_dir),
                        args.val_fraction, args.max_stories, progress)
    if sys.stderr.isatty() and not hit:
        print(file=sys.stderr)
    m = TokenCache.open(path).manifest
    secs = time.time() - t0
    print(f"{'cache hit' if hit else f'built in {secs:.1f}s'}: {path}")
    for split, s in m["splits"].items():
        print(f"  {split:5} {s['documents']:>9,} stories {s['tokens']:>13,} tokens {s['bytes']:>14,} bytes "
              f"({s['bytes'] / max(s['tokens'], 1):.2f} bytes/token)")
    print(f"  tokenizer {m['tokenizer']['path']} (sha256 {m['tokenizer']['sha256'][:12]}), dtype {m['dtype']}")
    note = empty_val_note(m, source, "--val-fraction ")
    if note:
        print(note)
    return 0


def register_cli(sub) -> None:
    from tinystories.cli import add_command

    data = sub.add_parser("data", help="get TinyStories and build the token cache",
                          description="Get TinyStories text and turn it into a token cache.")
    dsub = data.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    p = add_command(dsub, "fetch", "download TinyStories from the Hugging Face Hub, or register local files",
                    "  tinystories data fetch                     # TinyStoriesV2-GPT4 train+valid into data/raw\n"
                    "  tinystories data fetch --version v1\n"
                    "  tinystories data fetch --from ../shared/data/tinystories   # offline: local files\n",
                    _cmd_fetch)
    p.add_argument("--version", default="v2", choices=["v1", "v2"], help="v2 = TinyStoriesV2-GPT4 (default), v1 = TinyStories")
    p.add_argument("--from", dest="source", help="local file or directory (.txt, .json, .jsonl) instead of downloading")
    p.add_argument("--data-dir", default="data", help="data directory (default: data)")

    p = add_command(dsub, "prepare", "tokenize every story into a fingerprinted, memory-mapped token cache",
                    "  tinystories data prepare --tokenizer data/tokenizer --from ../shared/data/tinystories\n"
                    "  tinystories data prepare --tokenizer ../shared/models/llama2-tokenizer/tokenizer.model --from stories.jsonl\n",
                    _cmd_prepare)
    p.add_argument("--tokenizer", required=True, help="tokenizer.json, SentencePiece .model, or a directory with one")
    p.add_argument("--from", dest="source", help="raw text file or directory (default: what `data fetch` downloaded)")
    p.add_argument("--data-dir", default="data", help="data directory; the cache goes to DATA_DIR/cache")
    p.add_argument("--cache-dir", default=None, help="cache root (default: DATA_DIR/cache)")
    p.add_argument("--val-fraction", type=float, default=0.01,
                   help="held-out share in [0, 1) when there is no validation file: 1 story in round(1/F), at most "
                        "1 in 2 (default 0.01; 0 = none, and training then validates on the train split)")
    p.add_argument("--max-stories", type=int, default=None, help="use only the first N training stories")

    tok = sub.add_parser("tokenizer", help="train a BPE tokenizer and report on its vocabulary",
                         description="Train a byte-level BPE tokenizer, and show whether articles are single, frequent tokens.")
    tsub = tok.add_subparsers(dest="tokenizer_command", metavar="ACTION", required=True)
    p = add_command(tsub, "train", "train a byte-level BPE tokenizer (HF tokenizers) and print its report",
                    "  tinystories tokenizer train --vocab-size 10000 --from ../shared/data/tinystories --out data/tokenizer\n"
                    "  tinystories tokenizer train --vocab-size 4096 --max-stories 100000 --out data/tok4k\n",
                    _cmd_tokenizer_train)
    p.add_argument("--vocab-size", type=int, default=10000, help="vocabulary size (default 10000)")
    p.add_argument("--max-stories", type=int, default=None, help="train on the first N stories only")
    p.add_argument("--from", dest="source", help="raw text file or directory (default: what `data fetch` downloaded)")
    p.add_argument("--data-dir", default="data", help="data directory used when --from is not given")
    p.add_argument("--out", required=True, help="output directory for tokenizer.json")
    p.add_argument("--force", action="store_true", help="replace a tokenizer.json already in --out")

    p = add_command(tsub, "report", "vocabulary report: bytes/token, article tokens and their share, unused entries",
                    "  tinystories tokenizer report --tokenizer data/tokenizer --from ../shared/data/tinystories\n"
                    "  tinystories tokenizer report --tokenizer ../shared/models/llama2-tokenizer/tokenizer.model \\\n"
                    "      --tokenizer data/tokenizer --from ../shared/data/tinystories   # side by side\n",
                    _cmd_tokenizer_report)
    p.add_argument("--tokenizer", action="append", required=True, help="tokenizer to report on (repeatable)")
    p.add_argument("--from", dest="source", help="text to measure on (its validation file, else its last stories)")
    p.add_argument("--data-dir", default="data")
    p.add_argument("--stories", type=int, default=REPORT_STORIES, help=f"held-out stories to measure (default {REPORT_STORIES})")
    p.add_argument("--json", help="also write the report(s) as JSON to this file")
