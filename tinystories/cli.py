"""The `tinystories` command: one subcommand per pipeline stage.

This file declares every command, flag, default and help text; each command's handler (`_cmd_*`, in its stage
module) is named as "module:function" and imported only when the command runs. So `--help` and an argument error
answer at once: nothing here imports torch, numpy or pydantic (the defaults shown come from tinystories.core.defaults
and tinystories.inference.params; tests/test_cli_startup.py checks it). A `UserError` becomes one line on stderr
and exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import sys

from tinystories import __version__
from tinystories.core.args import OutOfRange, at_least, check_report_path, ranged, write_json_report  # noqa: F401
from tinystories.core.defaults import (
    DEFAULT_MAX_BATCH,
    DEFAULT_MAX_QUEUE,
    DEFAULT_STORIES,
    INFERENCE_DTYPES,
    PROMPT_KINDS,
    REPORT_STORIES,
    SAMPLE_STORIES,
    TOKENIZER_MAX_STORIES,
)
from tinystories.core.errors import UserError
from tinystories.inference.params import add_sampling_args


class _Formatter(argparse.RawDescriptionHelpFormatter):
    pass


class _Parser(argparse.ArgumentParser):
    """argparse's own errors (a bad type, a missing or unknown argument) in the project's form: one line,
    exit status 2, instead of the usage block followed by the message."""

    def error(self, message: str):
        self.exit(2, f"error: {self.prog}: {message} (see `{self.prog} --help`)\n")

    def _get_value(self, action, arg_string):
        # argparse's one hook between a type's error and the message: an OutOfRange names the flag and value
        try:
            return super()._get_value(action, arg_string)
        except argparse.ArgumentError as e:
            if isinstance(e.__context__, OutOfRange) and action.option_strings:
                raise argparse.ArgumentError(None, f"{action.option_strings[-1]} {arg_string}: {e.__context__}") \
                    from None
            raise


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="tinystories",
        description="From raw TinyStories text to a small Llama-style model that writes children's stories.",
        epilog="Run `tinystories COMMAND --help` for a command's options and examples.",
        formatter_class=_Formatter,
    )
    parser.add_argument("--version", action="version", version=f"tinystories {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in (_add_data, _add_tokenizer, _add_train, _add_plot, _add_generate, _add_eval, _add_doctor,
                _add_import_export, _add_serve, _add_quickstart):  # in the order of the pipeline
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0 if args.command is None else 2
    module, name = args.func.split(":")
    try:
        check_torch()  # before the handler's module imports torch
        return int(getattr(importlib.import_module(module), name)(args) or 0)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _version_tuple(text: str) -> tuple[int, ...]:
    """(2, 13, 0) from "2.13.0+cpu" (or "2.9.0a0+git..."): the leading release numbers."""
    m = re.match(r"\d+(?:\.\d+)*", text.strip())
    return tuple(int(x) for x in m.group(0).split(".")) if m else ()


def check_torch() -> None:
    """The installed torch against the floor tinystories' package metadata requires (written once, in
    pyproject.toml's dependencies): an older torch is one line naming both versions, before a command's module
    meets an API it lacks (torch.optim.Muon is 2.9+) as an AttributeError. Reads metadata only: no torch import."""
    from importlib import metadata
    from importlib.util import find_spec

    try:
        requires = metadata.requires("tinystories") or []
    except metadata.PackageNotFoundError:
        return  # run from a source tree that is not installed: nothing says what it needs
    floor = next((m.group(1) for r in requires
                  if (m := re.fullmatch(r"torch\s*>=\s*([\w.]+)", r.split(";")[0].strip()))), None)
    if floor is None:
        return
    try:
        installed = metadata.version("torch")
    except metadata.PackageNotFoundError:
        if find_spec("torch") is not None:
            return  # a torch without package metadata (built from source): its version cannot be read here
        raise UserError(f"torch is not installed; tinystories needs torch>={floor}: pip install 'torch>={floor}'") \
            from None
    want, have = _version_tuple(floor), _version_tuple(installed)
    width = max(len(want), len(have))
    if have + (0,) * (width - len(have)) < want + (0,) * (width - len(want)):
        raise UserError(f"this environment has torch {installed}, but tinystories needs torch>={floor} "
                        f"(torch.optim.Muon and newer APIs): pip install -U 'torch>={floor}'")


def add_command(sub, name: str, help: str, examples: str, func: str) -> argparse.ArgumentParser:
    """Add a subcommand whose --help ends with real examples; `func` names its handler, "module:function"."""
    p = sub.add_parser(name, help=help, description=help, epilog="examples:\n" + examples, formatter_class=_Formatter)
    p.set_defaults(func=func)
    return p


# --------------------------------------------------------------------------------------------------------- the commands


def add_dtype_arg(p: argparse.ArgumentParser) -> None:
    """--dtype of generate, eval and serve: the weights' precision (model/precision.py)."""
    p.add_argument("--dtype", choices=INFERENCE_DTYPES, default="float32",
                   help="weights' precision: float32 (default, exact), bfloat16 (CPUs and GPUs with native bf16), "
                        "int8 (weight-only), auto (the fastest on this device within 0.5%% (bf16) / 1%% (int8) "
                        "bits per byte of float32); the startup line says which runs and why")


def _stories_arg(value: str) -> int | None:
    if value.strip().lower() == "all":
        return None
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of stories or 'all', not {value!r}") from None


def _add_data(sub) -> None:
    data = sub.add_parser("data", help="get TinyStories and build the token cache",
                          description="Get TinyStories text and turn it into a token cache.")
    dsub = data.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    p = add_command(dsub, "fetch", "download TinyStories from the Hugging Face Hub, or register local files",
                    "  tinystories data fetch                     # TinyStoriesV2-GPT4 train+valid into data/raw\n"
                    "  tinystories data fetch --version v1\n"
                    "  tinystories data fetch --from ../shared/data/tinystories   # offline: local files\n",
                    "tinystories.data.prepare:_cmd_fetch")
    p.add_argument("--version", default="v2", choices=["v1", "v2", "instruct"],
                   help="v2 = TinyStoriesV2-GPT4 (default), v1 = TinyStories, instruct = the JSON shards with each "
                        "story's request (words, features, summary), unpacked into DATA_DIR/raw/TinyStories_all_data")
    p.add_argument("--from", dest="source", help="local file or directory (.txt, .json, .jsonl) instead of downloading")
    p.add_argument("--data-dir", default="data", help="data directory (default: data)")

    p = add_command(dsub, "prepare", "tokenize every story into a fingerprinted, memory-mapped token cache",
                    "  tinystories data prepare --tokenizer data/tokenizer --from ../shared/data/tinystories\n"
                    "  tinystories data prepare --tokenizer ../shared/models/llama2-tokenizer/tokenizer.model "
                    "--from stories.jsonl\n",
                    "tinystories.data.prepare:_cmd_prepare")
    p.add_argument("--tokenizer", required=True, help="tokenizer.json, SentencePiece .model, or a directory with one")
    p.add_argument("--from", dest="source", help="raw text file or directory (default: what `data fetch` downloaded)")
    p.add_argument("--data-dir", default="data", help="data directory; the cache goes to DATA_DIR/cache")
    p.add_argument("--cache-dir", default=None, help="cache root (default: DATA_DIR/cache)")
    p.add_argument("--val-fraction", type=float, default=0.01,
                   help="held-out share in [0, 1) when there is no validation file: 1 story in round(1/F), at most "
                        "1 in 2 (default 0.01; 0 = none, and training then validates on the train split)")
    p.add_argument("--max-stories", type=int, default=None, help="use only the first N training stories")
    p.add_argument("--tokens", type=int, default=None,
                   help="build only a part: the first units of the train text holding at least N tokens (a later "
                        "run with a larger N, or without --tokens, adds only what is missing)")
    p.add_argument("--workers", type=int, default=None, help="tokenizer processes (default: one per CPU core)")
    p.add_argument("--format", default="plain", choices=["plain", "instruct"],
                   help="plain stories (default), or instruct: each story behind its request (`Words: ...`, "
                        "`Features: ...`, `Summary: ...`, `Story: `), see docs/instruct.md")

    p = add_command(dsub, "verify", "check every byte of a token cache against the SHA-256 its manifest recorded",
                    "  tinystories data verify                    # every cache under data/cache\n"
                    "  tinystories data verify --cache data/cache/0123456789abcdef\n",
                    "tinystories.data.prepare:_cmd_verify")
    p.add_argument("--cache", default=None, help="a cache directory, or a root of caches (default: DATA_DIR/cache)")
    p.add_argument("--data-dir", default="data", help="data directory; its caches are in DATA_DIR/cache")


def _add_tokenizer(sub) -> None:
    tok = sub.add_parser("tokenizer", help="train a BPE tokenizer and report on its vocabulary",
                         description="Train a byte-level BPE tokenizer, "
                                     "and show whether articles are single, frequent tokens.")
    tsub = tok.add_subparsers(dest="tokenizer_command", metavar="ACTION", required=True)
    p = add_command(tsub, "train", "train a byte-level BPE tokenizer (HF tokenizers) and print its report",
                    "  tinystories tokenizer train --vocab-size 10000 --from ../shared/data/tinystories "
                    "--out data/tokenizer\n"
                    "  tinystories tokenizer train --vocab-size 4096 --max-stories 100000 --out data/tok4k\n",
                    "tinystories.data.prepare:_cmd_tokenizer_train")
    p.add_argument("--vocab-size", type=int, default=10000, help="vocabulary size (default 10000)")
    p.add_argument("--max-stories", type=_stories_arg, default=TOKENIZER_MAX_STORIES,
                   help=f"train on the first N stories only, or 'all' (default {TOKENIZER_MAX_STORIES:,}: "
                        f"bytes/token no longer improves much beyond that; see benchmarks/tokenizer_sample.py)")
    p.add_argument("--from", dest="source", help="raw text file or directory (default: what `data fetch` downloaded)")
    p.add_argument("--data-dir", default="data", help="data directory used when --from is not given")
    p.add_argument("--out", required=True, help="output directory for tokenizer.json")
    p.add_argument("--force", action="store_true", help="replace a tokenizer.json already in --out")

    p = add_command(tsub, "report", "vocabulary report: bytes/token, article tokens and their share, unused entries",
                    "  tinystories tokenizer report --tokenizer data/tokenizer --from ../shared/data/tinystories\n"
                    "  tinystories tokenizer report --tokenizer ../shared/models/llama2-tokenizer/tokenizer.model \\\n"
                    "      --tokenizer data/tokenizer --from ../shared/data/tinystories   # side by side\n",
                    "tinystories.data.prepare:_cmd_tokenizer_report")
    p.add_argument("--tokenizer", action="append", required=True, help="tokenizer to report on (repeatable)")
    p.add_argument("--from", dest="source", help="text to measure on (its validation file, else its last stories)")
    p.add_argument("--data-dir", default="data")
    p.add_argument("--stories", type=int, default=REPORT_STORIES,
                   help=f"held-out stories to measure (default {REPORT_STORIES})")
    p.add_argument("--json", help="also write the report(s) as JSON to this file")


def _add_train(sub) -> None:
    p = add_command(
        sub, "train", "train a Llama-style model on the token cache (CPU, GPU, or several under torchrun)",
        "  tinystories train --config configs/cpu.yaml --data ../shared/data/tinystories --out runs/cpu\n"
        "  tinystories train --config configs/tinystories-23M.yaml --set train.lr=3e-4 --set train.compile=true\n"
        "  tinystories train --resume runs/cpu                      # continue exactly where it stopped\n"
        "  tinystories train --resume runs/cpu --set train.max_steps=6000   # ... and train longer\n"
        "  tinystories train --init-from runs/stories260K --data ../shared/data/tinystories --out runs/ft \\\n"
        "      --set train.max_steps=200    # fine-tune: architecture and tokenizer from the checkpoint\n"
        "  torchrun --nproc_per_node=8 -m tinystories train --config configs/tinystories-23M.yaml\n",
        "tinystories.training.command:_cmd_train")
    p.add_argument("--config", help="run config (YAML), e.g. configs/cpu.yaml, or auto: the GPU config on a GPU, on "
                                    "a CPU cpu.yaml sized to this machine and train.max_minutes (optional with "
                                    "--init-from: train.* and data.* only; not with --resume)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config key, e.g. train.lr=3e-4 (repeatable)")
    p.add_argument("--out", help="run directory (overrides out_dir)")
    p.add_argument("--data", help="raw text file or directory (overrides data.source)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its latest checkpoint")
    p.add_argument("--init-from", metavar="CHECKPOINT",
                   help="fine-tune: a new run starting from these weights (a checkpoint or run directory) with a fresh "
                        "optimizer; its architecture (model.*) and tokenizer come from the checkpoint")
    p.add_argument("--micro-batch", metavar="N|auto",
                   help="micro-batch per process; auto finds the largest that fits (GPU)")
    p.add_argument("--force", action="store_true", help="overwrite an existing run in --out")


def _add_plot(sub) -> None:
    p = add_command(sub, "plot", "plot train/val loss, bits per byte and lr against tokens (PNG)",
                    "  tinystories plot runs/cpu                 # writes runs/cpu/loss.png\n"
                    "  tinystories plot runs/cpu --out cpu.png\n", "tinystories.evaluation.plot:_cmd_plot")
    p.add_argument("run_dir", help="run directory with metrics.jsonl")
    p.add_argument("--out", help="PNG path (default RUN_DIR/loss.png); missing parent directories are created")


def _add_generate(sub) -> None:
    p = add_command(
        sub, "generate", "write stories with a model (KV cache, streamed as they are produced)",
        "  tinystories generate --checkpoint runs/cpu --prompt \"Once upon a time\"\n"
        "  tinystories generate --checkpoint runs/cpu --prompt \"\" --temperature 0      # greedy, from nothing\n"
        "  tinystories generate --checkpoint runs/cpu --prompt \"Lily saw a\" --num-samples 8\n"
        "  tinystories generate --checkpoint runs/cpu --compile                # interactive, compiled decoding\n"
        "  tinystories generate --checkpoint runs/instruct --words dragon,cookie,brave --features dialogue\n",
        "tinystories.inference.generate:_cmd_generate")
    p.add_argument("--checkpoint", required=True,
                   help="run directory (uses its best checkpoint) or checkpoint directory")
    p.add_argument("--prompt", default=None,
                   help="story opening; \"\" starts from the start-of-story token alone; omit for an interactive loop")
    add_sampling_args(p)
    p.add_argument("--num-samples", type=at_least(1), default=1, help="stories to sample in one batch (default 1)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, mps")
    p.add_argument("--threads", type=at_least(1), default=None, help="CPU threads for torch")
    add_dtype_arg(p)
    p.add_argument("--compile", action="store_true",
                   help="compile the one-token decoding step (torch.compile): 1.1-1.6x faster decoding on CPU after a "
                        "few seconds of compiling; worth it for many or long stories and interactive sessions")
    _add_request_args(p)


def _add_request_args(p) -> None:
    """--words, --features, --summary, --word-bias: ask a model trained with data.format=instruct for a story."""
    from tinystories.data.requests import FEATURES

    p.add_argument("--words", type=lambda v: [w for w in v.split(",") if w.strip()], default=[],
                   help="up to three words the story should use, comma-separated (a model trained with "
                        "data.format=instruct; docs/instruct.md)")
    p.add_argument("--features", type=lambda v: [f for f in v.split(",") if f.strip()], default=[],
                   help=f"features the story should have, comma-separated: {', '.join(f.lower() for f in FEATURES)}")
    p.add_argument("--summary", default="", help="what the story should be about, in a sentence")
    _add_word_bias_arg(p, "logit bonus for requested words not yet in the story, fading as they appear")


def _add_word_bias_arg(p, what: str) -> None:
    """--word-bias and --candidates (generate, eval --instruct): decoding's help with a request, defaults
    data/requests.py's."""
    from tinystories.data.requests import CANDIDATES, WORD_BIAS

    p.add_argument("--word-bias", type=float, default=WORD_BIAS, help=f"{what} (default {WORD_BIAS:g}; 0 = off)")
    p.add_argument("--candidates", type=at_least(1), default=CANDIDATES, metavar="N",
                   help=f"a story asked for with words or features is the best of N drawn together: the one that "
                        f"has most of what was asked, then reads likeliest to the model (default {CANDIDATES}; 1 "
                        f"streams a single story as it is written)")


def _tokens_or_all(value: str) -> int | None:
    """--max-tokens N, or all (every token of the text)."""
    return None if value.strip().lower() == "all" else int(value)


def _add_eval(sub) -> None:
    p = add_command(
        sub, "eval",
        "likelihood (loss, perplexity, bits per byte), story statistics vs real stories, optional LLM judge",
        "  tinystories eval --checkpoint runs/tiny                     # the run's validation split, 20 stories\n"
        "  tinystories eval --checkpoint runs/tiny --text ../shared/data/tinystories/TinyStories-valid-head.txt "
        "--json eval.json\n"
        "  tinystories eval --checkpoint runs/tiny --num-stories 0     # likelihood only\n"
        "  tinystories eval --checkpoint runs/tiny --judge-url http://localhost:8000 --judge-model llama3\n"
        "  tinystories eval --checkpoint runs/tiny --prompts held-out --show-grammar-errors 5   # real story starts\n"
        "  tinystories eval --checkpoint runs/instruct --instruct --text ../shared/data/tinystories/"
        "TinyStories-valid-head.txt --plain-checkpoint runs/plain\n",
        "tinystories.evaluation.evaluate:_cmd_eval")
    p.add_argument("--checkpoint", required=True, help="run directory (its best checkpoint) or checkpoint directory")
    p.add_argument("--text", help="text file/directory to score (default: the validation split of the run's cache)")
    p.add_argument("--max-tokens", type=_tokens_or_all, default=None,
                   help="score the first N tokens (of the run's validation split: the text a training run with "
                        "train.eval_tokens=N evaluates), or 'all' (default: all the text)")
    p.add_argument("--skip-tokens", type=at_least(0), default=0,
                   help="score the run's validation split after its first N tokens: a run with "
                        "train.eval_tokens=N chose its best checkpoint on those, so the rest is text the selection "
                        "never saw (default 0)")
    p.add_argument("--num-stories", type=int, default=DEFAULT_STORIES,
                   help=f"stories to generate (default {DEFAULT_STORIES}; 0 = none)")
    p.add_argument("--reference",
                   help="real stories to compare with (default: the cache's validation split, else --text)")
    p.add_argument("--train-text", help="training text for the invented-words statistic (default: the cache's sources)")
    add_sampling_args(p, repetition_penalty=False)
    p.add_argument("--judge-url",
                   help="OpenAI-compatible endpoint, e.g. http://localhost:8000 (POST /v1/chat/completions)")
    p.add_argument("--judge-model", help="model name to send to the judge")
    p.add_argument("--judge-timeout", type=float, default=60.0, help="seconds per judge request")
    p.add_argument("--json", help="write every figure and the samples to this JSON file")
    p.add_argument("--prompts", choices=PROMPT_KINDS, default="openings",
                   help="openings: the fixed story openings (default); held-out: the first sentence or two of real "
                        "held-out stories (the reference), as in the TinyStories paper (the judge sees the same)")
    p.add_argument("--show-grammar-errors", type=int, default=0, metavar="N",
                   help="print N generated sentences the grammar parser (link-parser) rejects, with their stories")
    p.add_argument("--no-grammar", dest="grammar", action="store_false",
                   help="skip the grammar parser (Link Grammar's link-parser) rows")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps")
    p.add_argument("--instruct", action="store_true",
                   help="how well a model trained on requests follows them: --num-stories word triples and features "
                        "drawn from the held-out --text, asked with and without decoding's word bias and without a "
                        "request (docs/instruct.md)")
    p.add_argument("--plain-checkpoint", help="with --instruct: a plain model trained for the same budget, beside it")
    _add_word_bias_arg(p, "with --instruct: decoding's logit bonus for requested words")
    add_dtype_arg(p)


def _add_doctor(sub) -> None:
    p = add_command(
        sub, "doctor", "check a run for common mistakes (split article tokens, stale cache, overfitting, lr schedule, "
        "vocabulary size, grammar of samples)",
        "  tinystories doctor runs/tiny\n"
        "  tinystories doctor runs/tiny --samples 0        # skip generating samples\n"
        "  tinystories doctor runs/imported/checkpoint "
        "--reference ../shared/data/tinystories/TinyStories-valid-head.txt\n",
        "tinystories.evaluation.doctor:_cmd_doctor")
    p.add_argument("run_dir", help="run directory (or a checkpoint directory)")
    p.add_argument("--samples", type=int, default=SAMPLE_STORIES,
                   help=f"stories to sample for the article and grammar checks (default {SAMPLE_STORIES}; 0 = skip)")
    p.add_argument("--reference",
                   help="real stories for the article and grammar comparisons (default: the run's validation split)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, auto")
    p.add_argument("--json", help="also write the checks as JSON")


def _add_import_export(sub) -> None:
    p = add_command(
        sub, "import", "Import a model from another project into a checkpoint directory.",
        "  tinystories import llama2c ../shared/models/llama2c-stories260K/stories260K.bin \\\n"
        "      --tokenizer ../shared/models/llama2c-stories260K/tok512.model --out runs/stories260K\n",
        "tinystories.export.commands:_cmd_import",
    )
    formats = p.add_subparsers(dest="import_format", metavar="FORMAT")
    q = formats.add_parser(
        "llama2c", help="a llama2.c model file (.bin, version 0 or 1) and its tokenizer",
        description="Read a llama2.c fp32 model file (legacy version 0 or version 1) and write a checkpoint "
                    "directory that generate, eval, serve and train --init-from accept.",
    )
    q.add_argument("model", help="llama2.c model file, e.g. stories260K.bin")
    q.add_argument("--tokenizer", required=True, help="its tokenizer: SentencePiece .model (or a tokenizer.json)")
    q.add_argument("--out", required=True, help="checkpoint directory to create")
    q.add_argument("--force", action="store_true", help="replace --out if it exists")
    q.set_defaults(func="tinystories.export.commands:_cmd_import_llama2c")

    e = add_command(
        sub, "export", "Export a checkpoint to Hugging Face transformers, GGUF (llama.cpp, Ollama) or llama2.c.",
        "  tinystories export --format hf --checkpoint runs/stories260K --out exports/stories260K-hf\n"
        "  tinystories export --format hf --checkpoint runs/quickstart --out exports/qs-hf --push-to-hub NAME/qs\n"
        "  tinystories export --format gguf --checkpoint runs/stories260K --out exports/s260K.gguf [--dtype q8_0]\n"
        "  tinystories export --format llama2c --checkpoint runs/stories260K --out exports/model.bin\n",
        "tinystories.export.commands:_cmd_export",
    )
    e.add_argument("--format", required=True, choices=["hf", "gguf", "llama2c"],
                   help="hf: a LlamaForCausalLM directory with a model card; gguf: one file for llama.cpp/Ollama; "
                        "llama2c: a .bin for run.c")
    e.add_argument("--checkpoint", required=True, help="checkpoint directory or run directory")
    e.add_argument("--out", required=True, help="directory (hf) or file (gguf: FILE.gguf, llama2c: FILE.bin) to write")
    e.add_argument("--dtype", choices=["f32", "f16", "q8_0"], default=None, help="gguf: weight type (default f32)")
    e.add_argument("--version", type=int, choices=[0, 1], default=None, help="llama2.c file version (default 0, what "
                                                                             "run.c reads)")
    e.add_argument("--tokenizer-out", default=None, help="llama2c: where to write tokenizer.bin (default: beside "
                                                         "--out)")
    e.add_argument("--force", action="store_true", help="replace existing output")
    e.add_argument("--push-to-hub", metavar="OWNER/NAME", default=None,
                   help="hf, gguf: then upload to this Hugging Face Hub repository (created if needed; token from "
                        "HF_TOKEN or `hf auth login`)")
    e.add_argument("--private", action="store_true", help="with --push-to-hub: create the repository private")
    e.add_argument("--revision", metavar="BRANCH", default=None,
                   help="with --push-to-hub: push to this branch (created if needed)")
    e.add_argument("--eval-json", metavar="FILE", default=None,
                   help="hf, gguf: the `tinystories eval --json` report to put in the model card (default: one in the "
                        "run directory for this checkpoint, if any)")


def _add_serve(sub) -> None:
    p = add_command(
        sub, "serve", "Serve a checkpoint over HTTP: a JSON/streaming API, an OpenAI-compatible endpoint and a "
                      "browser playground.",
        "  tinystories serve --checkpoint runs/tiny            # then open http://127.0.0.1:8000/\n"
        "  tinystories serve --checkpoint ck/ --port 8080 --max-batch 32 --max-queue 512 --timeout 30\n"
        "  tinystories serve --checkpoint ck/ --cors-origin http://localhost:3000\n"
        "  TINYSTORIES_API_KEY=secret tinystories serve --checkpoint ck/ --host 0.0.0.0   # a class shares it\n"
        "  curl -N -X POST localhost:8000/v1/generate -H 'content-type: application/json' \\\n"
        "       -d '{\"prompt\": \"Once upon a time\", \"stream\": true}'\n",
        "tinystories.inference.server:_cmd_serve",
    )
    p.add_argument("--checkpoint", required=True, help="checkpoint directory or run directory (its best checkpoint)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default: loopback only; 0.0.0.0: every interface, say with --api-key)")
    p.add_argument("--api-key", default=None, metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on the API (/v1/...); default: $TINYSTORIES_API_KEY, "
                        "else no key. The playground asks for it once")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    p.add_argument("--max-batch", type=int, default=None,
                   help="requests decoded together, one batched forward per token; more wait in the queue "
                        f"(default: {DEFAULT_MAX_BATCH})")
    p.add_argument("--max-concurrent", type=int, default=None, help="the old name of --max-batch")
    p.add_argument("--max-queue", type=int, default=DEFAULT_MAX_QUEUE,
                   help="requests waiting for a free row; beyond it, 429 with Retry-After (default: "
                        f"{DEFAULT_MAX_QUEUE}; 0: no queue)")
    p.add_argument("--queue-timeout", type=float, default=60.0,
                   help="seconds a request may wait in the queue before a 503 (default: 60)")
    p.add_argument("--timeout", type=float, default=60.0, help="time limit per generation in seconds (default: 60)")
    p.add_argument("--cors-origin", nargs="+", default=[], metavar="ORIGIN",
                   help="allow browser pages from these origins to call the API (default: none, CORS closed)")
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads of the decoding loop (default: 1 on CPU: the HTTP side needs a core)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                   help="compile the one-token decoding step at startup (torch.compile; a few seconds, falls back to "
                        "eager if it cannot): ~2x the tokens/s under load on CPU (default: on; --no-compile to skip)")
    add_dtype_arg(p)
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn log level (default: info)")


def _add_quickstart(sub) -> None:
    p = add_command(sub, "quickstart",
                    "the main job: data -> tokenizer -> cache -> train -> stories and an eval report",
                    "  tinystories quickstart                                   # download, 10 minutes on CPU\n"
                    "  tinystories quickstart --data ../shared/data/tinystories --minutes 5\n"
                    "  TINYSTORIES_DATA=../shared/data/tinystories QUICKSTART_MINUTES=10 make quickstart\n",
                    "tinystories.quickstart:_cmd_quickstart")
    p.add_argument("--data",
                   help="raw text file or directory (default: $TINYSTORIES_DATA, a previous download, else the Hub)")
    p.add_argument("--minutes", type=float, default=None,
                   help="training budget in minutes (default $QUICKSTART_MINUTES or 10)")
    p.add_argument("--out", default="runs/quickstart", help="run directory (default runs/quickstart)")
    p.add_argument("--instruct", action="store_true",
                   help="train on stories behind their requests (data.format=instruct), so that `generate --words "
                        "... --features ...` can ask for a story (docs/instruct.md)")
    p.add_argument("--data-dir", default="data", help="where downloads, tokenizers and caches go (default data)")
