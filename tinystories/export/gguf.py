"""GGUF export: one file that llama.cpp (and Ollama, LM Studio and everything built on it) runs.

    tinystories export --format gguf --checkpoint RUN --out FILE.gguf [--dtype f32|f16|q8_0]

Written with `gguf`, llama.cpp's own GGUF writer. The model is llama.cpp's `llama` architecture:

* weights unchanged: llama.cpp's `llama` rotates pairs of consecutive head values ("normal" RoPE, Meta's layout),
  the layout our model and llama2.c use. (llama.cpp's convert_hf_to_gguf.py permutes Hugging Face's q/k rows back
  to this layout; our rows are already in it.) A tied output matrix is left out: llama.cpp then reuses
  token_embd.weight.
* the tokenizer is embedded: our byte-level BPE as a GPT-2 style `gpt2` vocabulary (byte-level token strings, merges,
  pre-tokenizer `gpt-2`, the GPT-2 regex that `tokenizers`' ByteLevel pre-tokenizer uses); a SentencePiece model
  (llama2.c's tok512, Llama 2's) as a `llama` vocabulary with its scores and token types.
* BOS is our start-of-story token, added before every prompt (as `tinystories generate` does); EOS is the token
  a story ends with in training data, which is that same start-of-story token (our BPE's `<|endoftext|>`,
  llama2.c's BOS). llama.cpp also stops at `</s>` by itself, so it stops where our sampling stops.
* --dtype: f32 (exact), f16, or q8_0 (gguf's reference quantizer; a matrix whose rows are not a multiple of 32
  values stays f16, as llama.cpp's own converter does). Norm weights stay f32 in every case.

Next to FILE.gguf goes FILE.Modelfile for Ollama (`ollama create NAME -f FILE.Modelfile`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from tinystories.core.atomic import (
    disk_full_is_user_error,
    ensure_writable_dir,
    fsync_dir,
    temp_name,
    write_text_atomic,
)
from tinystories.core.defaults import SAMPLE_PROMPT
from tinystories.core.errors import UserError
from tinystories.data.tokenizer import sentencepiece_proto
from tinystories.export.outputs import check_replaceable_file

DTYPES = ("f32", "f16", "q8_0")
INSTALL = "pip install 'tinystories[gguf]'  (or: pip install gguf)"

# SentencePiece / llama.cpp token types (the same numbering in both projects)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def _gguf():
    try:
        import gguf
    except ImportError:
        raise UserError(f"--format gguf needs the `gguf` package: {INSTALL}") from None
    return gguf


# ------------------------------------------------------------------------------------------------ tokenizer


def bpe_vocab(tok) -> dict:
    """Our byte-level BPE (tokenizer.json) as a llama.cpp `gpt2` vocabulary. Refuses what llama.cpp would tokenize
    differently (another pre-tokenizer, a normalizer, byte fallback)."""
    spec = json.loads(Path(tok.path).read_text(encoding="utf-8"))
    model = spec.get("model") or {}
    where = f"{tok.path}"

    def refuse(what: str):
        raise UserError(f"{where}: {what}; the GGUF export writes byte-level BPE tokenizers (GPT-2 style, as "
                        f"`tinystories tokenizer train` makes them) and SentencePiece models")

    if model.get("type") != "BPE":
        refuse(f"the tokenizer model is {model.get('type')!r}, not BPE")
    if any(model.get(k) for k in ("byte_fallback", "dropout", "ignore_merges", "continuing_subword_prefix",
                                  "end_of_word_suffix")):
        refuse("its BPE options (byte_fallback/dropout/ignore_merges/subword affixes) have no llama.cpp equivalent")
    if spec.get("normalizer"):
        refuse("it has a normalizer")
    pre = spec.get("pre_tokenizer") or {}
    if pre.get("type") == "Sequence" and len(pre.get("pretokenizers", [])) == 1:
        pre = pre["pretokenizers"][0]
    if pre.get("type") != "ByteLevel" or not pre.get("use_regex", True) or pre.get("add_prefix_space"):
        refuse("its pre-tokenizer is not ByteLevel(add_prefix_space=False) with the GPT-2 regex")
    vocab = tok.tok.get_vocab(with_added_tokens=True)
    if sorted(vocab.values()) != list(range(len(vocab))):
        refuse("its token ids are not 0..N-1")
    tokens = [""] * len(vocab)
    for piece, i in vocab.items():
        tokens[i] = piece
    special = {t["id"] for t in spec.get("added_tokens", []) if t.get("special")}
    types = [CONTROL if i in special else NORMAL for i in range(len(tokens))]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return {"model": "gpt2", "pre": "gpt-2", "tokens": tokens, "types": types, "merges": merges, "scores": None,
            "add_space_prefix": None}


def sentencepiece_vocab(tok) -> dict:
    """A SentencePiece model as a llama.cpp `llama` vocabulary: pieces, scores, token types."""
    proto = sentencepiece_proto(tok.path)
    norm, spec = proto.normalizer_spec, proto.trainer_spec
    if norm.precompiled_charsmap:
        raise UserError(f"{tok.path}: SentencePiece models with a normalization charsmap (e.g. nfkc) have no llama.cpp "
                        f"equivalent; train the tokenizer with normalization_rule_name=identity")
    if spec.treat_whitespace_as_suffix:
        raise UserError(f"{tok.path}: treat_whitespace_as_suffix SentencePiece models are not supported by the GGUF "
                        f"export")
    sp = tok.sp
    tokens, scores, types = [], [], []
    for i in range(sp.vocab_size()):
        tokens.append(sp.id_to_piece(i))
        scores.append(sp.get_score(i))
        kind = proto.pieces[i].type  # NORMAL=1, UNKNOWN=2, CONTROL=3, USER_DEFINED=4, BYTE=6, UNUSED=5
        types.append(kind if kind in (NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE) else NORMAL)
    return {"model": "llama", "pre": "default", "tokens": tokens, "types": types, "merges": None, "scores": scores,
            "add_space_prefix": bool(norm.add_dummy_prefix)}


def gguf_vocab(tok) -> dict:
    v = bpe_vocab(tok) if tok.kind == "bpe" else sentencepiece_vocab(tok)
    v["bos"] = tok.doc_start_id
    # the token a story ends with: the start-of-story token opens the next one (llama2.c's run.c stops at BOS too)
    v["eos"] = tok.doc_start_id if tok.doc_start_id in tok.stop_ids else min(tok.stop_ids)
    if tok.kind == "sentencepiece" and tok.sp.unk_id() >= 0:
        v["unk"] = tok.sp.unk_id()
    return v


# ------------------------------------------------------------------------------------------------ weights


def gguf_tensors(model) -> list[tuple[str, np.ndarray]]:
    """(GGUF tensor name, fp32 array in PyTorch (out, in) layout) in llama.cpp's order; no permutation (see above)."""
    cfg = model.cfg
    sd = {k: v.detach().to("cpu").float().numpy() for k, v in model.state_dict().items()}
    out = [("token_embd.weight", sd["tok_embeddings.weight"])]
    names = {"attention_norm": "attn_norm", "attention.wq": "attn_q", "attention.wk": "attn_k",
             "attention.wv": "attn_v", "attention.wo": "attn_output", "ffn_norm": "ffn_norm",
             "feed_forward.w1": "ffn_gate", "feed_forward.w3": "ffn_up", "feed_forward.w2": "ffn_down"}
    for i in range(cfg.n_layers):
        for ours, theirs in names.items():
            out.append((f"blk.{i}.{theirs}.weight", sd[f"layers.{i}.{ours}.weight"]))
    out.append(("output_norm.weight", sd["norm.weight"]))
    tied = cfg.tie_embeddings or np.array_equal(sd["output.weight"], sd["tok_embeddings.weight"])
    if not tied:
        out.append(("output.weight", sd["output.weight"]))
    return out


def _encode_tensor(gguf, arr: np.ndarray, dtype: str):
    """(data, raw_dtype or None) for GGUFWriter.add_tensor; vectors stay f32."""
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if arr.ndim == 1 or dtype == "f32":
        return arr, None
    if dtype == "q8_0":
        block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0]
        if arr.shape[-1] % block == 0:
            return gguf.quants.quantize(arr, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0
    return arr.astype(np.float16), None


# ------------------------------------------------------------------------------------------------ files


def _add_model(w, gguf, cfg, file_type, name: str) -> None:
    """The `llama` architecture's hyperparameters."""
    w.add_name(name)
    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(cfg.dim)
    w.add_block_count(cfg.n_layers)
    w.add_feed_forward_length(cfg.ffn_dim)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.kv_heads)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_rope_freq_base(float(cfg.rope_theta))
    w.add_layer_norm_rms_eps(float(cfg.norm_eps))
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(file_type)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _add_vocab(w, vocab: dict) -> None:
    """The embedded tokenizer (gguf_vocab); llama.cpp adds BOS before a prompt, never EOS."""
    w.add_tokenizer_model(vocab["model"])
    w.add_tokenizer_pre(vocab["pre"])
    w.add_token_list(vocab["tokens"])
    w.add_token_types(vocab["types"])
    if vocab["scores"] is not None:
        w.add_token_scores(vocab["scores"])
    if vocab["merges"] is not None:
        w.add_token_merges(vocab["merges"])
    if vocab["add_space_prefix"] is not None:
        w.add_add_space_prefix(vocab["add_space_prefix"])
    w.add_bos_token_id(vocab["bos"])
    w.add_eos_token_id(vocab["eos"])
    if "unk" in vocab:
        w.add_unk_token_id(vocab["unk"])
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)


def _add_tensors(w, gguf, model, dtype: str) -> dict[str, int]:
    """Every weight, encoded as `dtype`; returns how many tensors of each stored type."""
    counts: dict[str, int] = {}
    for tname, arr in gguf_tensors(model):
        data, raw = _encode_tensor(gguf, arr, dtype)
        kind = raw.name if raw is not None else str(data.dtype).replace("float", "F")
        counts[kind] = counts.get(kind, 0) + 1
        w.add_tensor(tname, data, raw_dtype=raw)
    return counts


def write_gguf(model, tok, out: Path, dtype: str = "f32", name: str = "tinystories") -> dict:
    """Write `model` with its tokenizer as a GGUF file (atomically). Returns a summary."""
    gguf = _gguf()
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype}: GGUF export writes {', '.join(DTYPES)}")
    cfg = model.cfg
    vocab = gguf_vocab(tok)
    if len(vocab["tokens"]) != cfg.vocab_size:
        raise UserError(f"{tok.path}: the tokenizer has {len(vocab['tokens'])} tokens, the model {cfg.vocab_size}")
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype]
    tmp = temp_name(out)
    try:
        with disk_full_is_user_error(out, "GGUF file"):
            w = gguf.GGUFWriter(str(tmp), "llama")
            _add_model(w, gguf, cfg, file_type, name)
            _add_vocab(w, vocab)
            counts = _add_tensors(w, gguf, model, dtype)
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_tensors_to_file()
            w.close()
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, out)
            fsync_dir(out.parent)
    finally:
        tmp.unlink(missing_ok=True)
    return {"bytes": out.stat().st_size, "tensors": counts, "vocab": vocab}


def modelfile_text(gguf_name: str, tok, max_seq_len: int) -> str:
    """An Ollama Modelfile for the GGUF beside it: raw completion (no chat template), our sampling defaults."""
    from tinystories.inference.sampling import SamplingParams

    p = SamplingParams()
    stops = sorted({tok.id_to_piece(i) for i in tok.stop_ids})
    stem = Path(gguf_name).stem
    lines = [f"# Ollama: ollama create NAME -f {stem}.Modelfile && ollama run NAME \"{SAMPLE_PROMPT}\"",
             f"FROM ./{gguf_name}",
             'TEMPLATE """{{ .Prompt }}"""']
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    lines += [f"PARAMETER temperature {p.temperature}", f"PARAMETER top_k {p.top_k}", f"PARAMETER top_p {p.top_p}",
              f"PARAMETER repeat_penalty {p.repetition_penalty}", f"PARAMETER num_ctx {max_seq_len}",
              f"PARAMETER num_predict {p.max_new_tokens}"]
    return "\n".join(lines) + "\n"


def modelfile_path(out: Path) -> Path:
    return out.with_name(out.stem + ".Modelfile")


def is_gguf_file(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def is_our_modelfile(path: Path) -> bool:
    return path.read_text(errors="replace").lstrip().startswith("# Ollama")


def export_gguf(model, tok, out: Path, dtype: str, force: bool, name: str) -> dict:
    """FILE.gguf and FILE.Modelfile beside it. An existing file is replaced only with --force, and only a GGUF."""
    if out.suffix != ".gguf":
        raise UserError(f"--out {out}: a GGUF file name ends in .gguf, e.g. --out {out.with_suffix('.gguf')}")
    if out.is_dir():
        raise UserError(f"{out} is a directory; --format gguf writes one file, e.g. --out {out / 'model.gguf'}")
    mf = modelfile_path(out)
    check_replaceable_file(out, force, is_gguf_file, "GGUF file")
    check_replaceable_file(mf, force, is_our_modelfile, "Modelfile written by this export")
    ensure_writable_dir(out.parent, "output")
    info = write_gguf(model, tok, out, dtype, name)
    write_text_atomic(mf, modelfile_text(out.name, tok, model.cfg.max_seq_len))
    info["modelfile"] = mf
    return info
