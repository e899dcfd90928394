"""The `tinystories import` and `tinystories export` commands: check the flags, load the checkpoint, call the
format's writer (llama2c.py, hf.py, gguf.py) and hub.py for the model card and --push-to-hub, and print what was
written and how to run it.

    tinystories import llama2c MODEL.bin --tokenizer TOKENIZER.model --out DIR
    tinystories export --format hf|gguf|llama2c --checkpoint CK --out PATH [--push-to-hub OWNER/NAME]

This module is also `tinystories.interop`, the name these commands had before the export package: the import and
export functions are importable from it too.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from tinystories.core.atomic import ensure_writable_dir, write_bytes_atomic
from tinystories.core.defaults import SAMPLE_PROMPT
from tinystories.core.errors import UserError
from tinystories.export.hf import (
    export_hf,
    hf_state_dict,
    permute_from_hf,
    permute_to_hf,
    sentencepiece_to_hf_tokenizer,
)
from tinystories.export.hub import check_push, export_name, find_eval_report, model_card, push_to_hub
from tinystories.export.llama2c import (
    check_llama2c_compatible,
    import_llama2c,
    is_llama2c_model,
    is_llama2c_tokenizer,
    llama2c_rope_tables,
    read_llama2c,
    sentencepiece_to_llama2c_bin,
    write_llama2c,
)
from tinystories.export.outputs import check_replaceable_file

__all__ = ["export_hf", "hf_state_dict", "import_llama2c", "llama2c_rope_tables", "permute_from_hf", "permute_to_hf",
           "read_llama2c", "sentencepiece_to_hf_tokenizer", "sentencepiece_to_llama2c_bin", "write_llama2c"]


# --------------------------------------------------------------------------------------------- import


def _cmd_import(args) -> int:
    raise UserError("name the source format: tinystories import llama2c MODEL.bin --tokenizer TOKENIZER.model --out "
                    "DIR")


def _cmd_import_llama2c(args) -> int:
    from tinystories.model.checkpoint import read_checkpoint

    out = import_llama2c(args.model, args.tokenizer, args.out, args.force)
    m = read_checkpoint(out).cfg.model
    print(f"imported {args.model} -> {out}")
    print(f"  dim={m.dim} layers={m.n_layers} heads={m.n_heads} kv_heads={m.kv_heads} hidden={m.ffn_dim} "
          f"vocab={m.vocab_size} ctx={m.max_seq_len} tied={m.tie_embeddings}")
    print(f"  try: tinystories generate --checkpoint {out} --prompt '{SAMPLE_PROMPT}'")
    return 0


# --------------------------------------------------------------------------------------------- export


def _check_export_flags(args) -> None:
    """Flags that do not go together, the Hub repository and the eval report: all before any export work."""
    if args.version is not None and args.format != "llama2c":
        raise UserError("--version applies to --format llama2c only")
    if args.dtype is not None and args.format != "gguf":
        raise UserError("--dtype applies to --format gguf only (hf and llama2c exports are fp32)")
    if args.format == "llama2c" and (args.push_to_hub or args.eval_json):
        raise UserError(f"{'--push-to-hub' if args.push_to_hub else '--eval-json'} applies to --format hf and gguf")
    if not args.push_to_hub and (args.private or args.revision):
        raise UserError(f"{'--private' if args.private else '--revision'} goes with --push-to-hub OWNER/NAME")
    if args.push_to_hub:
        check_push(args.push_to_hub)
    if args.eval_json:
        find_eval_report(Path("."), args.eval_json)  # readable and a report


def _cmd_export(args) -> int:
    from tinystories.model.checkpoint import load_model

    _check_export_flags(args)
    model, ck = load_model(args.checkpoint)
    export = {"hf": _export_hf, "gguf": _export_gguf, "llama2c": _export_llama2c}[args.format]
    return export(args, model, ck, Path(args.out))


def _export_hf(args, model, ck, out: Path) -> int:
    card = model_card(model, ck, fmt="hf", repo_id=args.push_to_hub, eval_json=args.eval_json)
    export_hf(model, ck.tokenizer, out, args.force, card)
    print(f"exported {ck.path} -> {out} (Hugging Face LlamaForCausalLM, fp32, model card README.md)")
    print(f"  load: AutoModelForCausalLM.from_pretrained({str(out)!r}); "
          f"AutoTokenizer.from_pretrained({str(out)!r})")
    if args.push_to_hub:
        url = push_to_hub(out, args.push_to_hub, args.private, args.revision)
        print(f"pushed {out} to {args.push_to_hub}: {url}")
    return 0


def _export_llama2c(args, model, ck, out: Path) -> int:
    """MODEL.bin and, for a SentencePiece model, tokenizer.bin beside it (kept when it is already this one)."""
    version = 0 if args.version is None else args.version
    tok_out = Path(args.tokenizer_out) if args.tokenizer_out else out.with_name("tokenizer.bin")
    if out.is_dir():
        raise UserError(f"{out} is a directory; --format llama2c writes one file, e.g. --out {out / 'model.bin'}")
    if tok_out.resolve() == out.resolve():
        raise UserError(f"--out {out} and the tokenizer file would be the same; pass --tokenizer-out")
    spm = ck.tokenizer.kind == "sentencepiece"
    tok_data = sentencepiece_to_llama2c_bin(Path(ck.tokenizer.path)) if spm else None
    check_replaceable_file(out, args.force, is_llama2c_model, "llama2.c model file")
    tok_same = tok_out.is_file() and tok_data is not None and tok_out.read_bytes() == tok_data
    if spm and not tok_same:  # the same tokenizer already there (another export of this model family) is kept
        check_replaceable_file(tok_out, args.force, is_llama2c_tokenizer, "llama2.c tokenizer",
                               " (it holds another model's tokenizer: give this one its own --tokenizer-out)")
    check_llama2c_compatible(model.cfg)
    ensure_writable_dir(out.parent, "output")
    n = write_llama2c(model, out, version)
    print(f"exported {ck.path} -> {out} (llama2.c version {version}, {n:,} bytes)")
    if not spm:
        print("  note: this model uses a byte-level BPE tokenizer; llama2.c's run.c only reads SentencePiece "
              "tokenizers (tokenizer.bin), so run.c cannot decode its output. The weights were exported anyway.")
        return 0
    if not tok_same:
        write_bytes_atomic(tok_out, tok_data)
    print(f"  tokenizer -> {tok_out} (llama2.c tokenizer.bin format{', already there' if tok_same else ''})")
    if version == 0:
        print(f"  run: ./run {out} -z {tok_out}")
    return 0


def _export_gguf(args, model, ck, out: Path) -> int:
    from tinystories.export.gguf import export_gguf

    dtype = args.dtype or "f32"
    name = args.push_to_hub.split("/")[-1] if args.push_to_hub else export_name(ck.path)
    info = export_gguf(model, ck.tokenizer, out, dtype, args.force, name)
    v = info["vocab"]
    kinds = ", ".join(f"{n} {k}" for k, n in sorted(info["tensors"].items()))
    print(f"exported {ck.path} -> {out} (GGUF, llama.cpp architecture llama, {dtype}: {kinds} tensors; "
          f"{info['bytes']:,} bytes)")
    print(f"  tokenizer: {v['model']} vocabulary of {len(v['tokens']):,} tokens (pre-tokenizer {v['pre']}), "
          f"BOS {v['bos']} {v['tokens'][v['bos']]!r}, EOS {v['eos']} {v['tokens'][v['eos']]!r}")
    print(f"  Ollama Modelfile -> {info['modelfile']}")
    print("run it:")
    print(f"  llama-cli -m {out} -p \"{SAMPLE_PROMPT}\" -n 256   # llama.cpp; newer builds: llama-completion -no-cnv")
    print(f"  ollama create {out.stem} -f {info['modelfile']} && ollama run {out.stem} \"{SAMPLE_PROMPT}\"")
    if args.push_to_hub:
        _push_gguf(args, model, ck, out, info["modelfile"])
    return 0


def _push_gguf(args, model, ck, out: Path, modelfile: Path) -> None:
    """Upload the GGUF, its Modelfile and a model card in one commit, staged as hard links (no copy of the
    weights where the filesystem allows links)."""
    card = model_card(model, ck, fmt="gguf", repo_id=args.push_to_hub, gguf_name=out.name, eval_json=args.eval_json)
    with tempfile.TemporaryDirectory(prefix=".push-", dir=out.parent) as stage:
        stage = Path(stage)
        for f in (out, modelfile):
            try:
                os.link(f, stage / f.name)
            except OSError:
                shutil.copyfile(f, stage / f.name)
        (stage / "README.md").write_text(card, encoding="utf-8")
        url = push_to_hub(stage, args.push_to_hub, args.private, args.revision)
    print(f"pushed {out.name}, {modelfile.name} and a model card to {args.push_to_hub}: {url}")
