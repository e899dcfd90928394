"""Interoperability: import llama2.c checkpoints, export to Hugging Face transformers and back to llama2.c.

    tinystories import llama2c MODEL.bin --tokenizer TOKENIZER.model --out DIR
    tinystories export --format hf      --checkpoint CK --out DIR
    tinystories export --format llama2c --checkpoint CK --out MODEL.bin [--version 0|1]

llama2.c binary formats (all little-endian, weights fp32, row-major, PyTorch `Linear` layout (out, in)):

* version 0 ("legacy"): seven int32 (dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len; a
  negative vocab_size means the classifier is not shared with the embedding), then token embedding, attention
  norms, wq, wk, wv, wo, ffn norms, w1, w2, w3, final norm, the RoPE tables cos and sin (seq_len x head_dim/2
  each), [classifier].
* version 1: a 256-byte header (uint32 magic "ak42" = 0x616b3432, int32 version = 1, the seven int32, uint8
  shared_classifier, zero padding), then attention norms, ffn norms, final norm, token embedding, wq, wk, wv,
  wo, w1, w2, w3, [classifier].

Our model rotates interleaved pairs like llama2.c, so llama2.c weights load unchanged; Hugging Face's Llama
rotates halves, so the HF export permutes the rows of wq and wk (as HF's convert_llama_weights_to_hf does).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
from pathlib import Path

import numpy as np
import torch

from tinystories.core.errors import UserError

MAGIC = 0x616B3432  # "ak42"
V1_HEADER_BYTES = 256
V0_HEADER_BYTES = 7 * 4
LLAMA2C_NORM_EPS = 1e-5  # run.c hard-codes these two
LLAMA2C_ROPE_THETA = 10000.0
_LIMITS = {"dim": 1 << 16, "hidden_dim": 1 << 18, "n_layers": 1024, "n_heads": 1024, "n_kv_heads": 1024,
           "vocab_size": 1 << 22, "seq_len": 1 << 20}


# ------------------------------------------------------------------------------------------- llama2.c read


def _check_header(p: dict, path: Path) -> None:
    for key, value in p.items():
        if not 0 < value <= _LIMITS[key]:
            raise UserError(f"{path}: impossible llama2.c header ({key}={value}); not a llama2.c model file?")
    if p["dim"] % p["n_heads"]:
        raise UserError(f"{path}: impossible llama2.c header (dim={p['dim']} is not divisible by "
                        f"n_heads={p['n_heads']})")
    if (p["dim"] // p["n_heads"]) % 2:
        raise UserError(f"{path}: impossible llama2.c header (head size {p['dim'] // p['n_heads']} is odd)")
    if p["n_heads"] % p["n_kv_heads"]:
        raise UserError(f"{path}: impossible llama2.c header (n_heads={p['n_heads']} is not a multiple of "
                        f"n_kv_heads={p['n_kv_heads']})")


def _weight_shapes(p: dict, order: str, shared: bool) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor in file order; names are our state-dict names ('' = skipped table)."""
    dim, hid, L, vocab = p["dim"], p["hidden_dim"], p["n_layers"], p["vocab_size"]
    hd = dim // p["n_heads"]
    q, kv = p["n_heads"] * hd, p["n_kv_heads"] * hd

    def per_layer(sub: str, shape):
        return [(f"layers.{i}.{sub}.weight", shape) for i in range(L)]

    att = per_layer("attention_norm", (dim,))
    ffn = per_layer("ffn_norm", (dim,))
    mats = (per_layer("attention.wq", (q, dim)) + per_layer("attention.wk", (kv, dim))
            + per_layer("attention.wv", (kv, dim))
            + per_layer("attention.wo", (dim, q)))
    mlp = (per_layer("feed_forward.w1", (hid, dim)) + per_layer("feed_forward.w2", (dim, hid))
           + per_layer("feed_forward.w3", (hid, dim)))
    emb = [("tok_embeddings.weight", (vocab, dim))]
    norm = [("norm.weight", (dim,))]
    if order == "v0":
        shapes = emb + att + mats + ffn + mlp + norm + [("", (p["seq_len"], hd // 2)), ("", (p["seq_len"], hd // 2))]
    else:
        shapes = att + ffn + norm + emb + mats + mlp
    if not shared:
        shapes.append(("output.weight", (vocab, dim)))
    return shapes


def read_llama2c(path: str | Path) -> tuple[dict, dict[str, torch.Tensor], dict]:
    """Read a llama2.c model file: (model config dict, state dict, info {version, shared, ...}).

    Raises UserError for anything that is not a complete, consistent version 0 or version 1 file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such llama2.c model file")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(V1_HEADER_BYTES)
    if len(head) < V0_HEADER_BYTES:
        raise UserError(f"{path}: truncated llama2.c file ({size} bytes, shorter than the {V0_HEADER_BYTES}-byte "
                        "header)")
    keys = ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len")
    (magic,) = struct.unpack("<I", head[:4])
    if magic == MAGIC:
        if len(head) < 4 + 4 + 28 + 1:
            raise UserError(f"{path}: truncated llama2.c file (the version header is incomplete)")
        (version,) = struct.unpack("<i", head[4:8])
        if version != 1:
            what = "int8-quantized (version 2)" if version == 2 else f"version {version}"
            raise UserError(f"{path}: llama2.c {what} files are not supported; export version 0 or 1 (fp32) with "
                            "llama2.c's export.py")
        p = dict(zip(keys, struct.unpack("<7i", head[8:36])))
        flag = head[36]
        if flag not in (0, 1):
            raise UserError(f"{path}: impossible llama2.c header (shared_classifier byte is {flag})")
        shared, order, offset = bool(flag), "v1", V1_HEADER_BYTES
    else:
        version = 0
        p = dict(zip(keys, struct.unpack("<7i", head[:28])))
        shared = p["vocab_size"] > 0
        p["vocab_size"] = abs(p["vocab_size"])
        order, offset = "v0", V0_HEADER_BYTES
    _check_header(p, path)
    shapes = _weight_shapes(p, order, shared)
    expected = offset + 4 * sum(int(np.prod(s)) for _, s in shapes)
    if size < expected:
        raise UserError(f"{path}: truncated llama2.c version-{version} file: the header needs {expected:,} bytes, "
                        f"the file has {size:,}")
    if size > expected:
        raise UserError(f"{path}: {size - expected:,} bytes more than a llama2.c version-{version} file with this "
                        f"header ({expected:,}); wrong header or not a llama2.c fp32 file")
    flat = np.fromfile(path, dtype="<f4", offset=offset)
    sd: dict[str, torch.Tensor] = {}
    pos = 0
    for name, shape in shapes:
        n = int(np.prod(shape))
        if name:
            sd[name] = torch.from_numpy(flat[pos : pos + n].reshape(shape).astype(np.float32))
        pos += n
    if not all(torch.isfinite(t).all() for t in sd.values()):
        raise UserError(f"{path}: the weights contain NaN or infinite values")
    if shared:
        sd["output.weight"] = sd["tok_embeddings.weight"]
    model_cfg = {"vocab_size": p["vocab_size"], "dim": p["dim"], "n_layers": p["n_layers"], "n_heads": p["n_heads"],
                 "n_kv_heads": p["n_kv_heads"], "hidden_dim": p["hidden_dim"], "max_seq_len": p["seq_len"],
                 "tie_embeddings": shared, "norm_eps": LLAMA2C_NORM_EPS, "rope_theta": LLAMA2C_ROPE_THETA}
    return model_cfg, sd, {"version": version, "shared_classifier": shared, "bytes": size}


# ------------------------------------------------------------------------------------------- llama2.c write


def llama2c_rope_tables(head_dim: int, seq_len: int,
                        theta: float = LLAMA2C_ROPE_THETA) -> tuple[torch.Tensor, torch.Tensor]:
    """The RoPE tables exactly as llama2.c's model.py precompute_freqs_cis computes them (legacy export)."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2)[: head_dim // 2].float() / head_dim))
    t = torch.arange(seq_len, device=freqs.device)
    freqs = torch.outer(t, freqs).float()
    return torch.cos(freqs), torch.sin(freqs)


def _check_llama2c_compatible(cfg) -> None:
    if cfg.norm_eps != LLAMA2C_NORM_EPS:
        raise UserError(f"model.norm_eps={cfg.norm_eps}: llama2.c's run.c hard-codes 1e-5, so this model cannot be "
                        "exported to it")
    if cfg.rope_theta != LLAMA2C_ROPE_THETA:
        raise UserError(f"model.rope_theta={cfg.rope_theta}: llama2.c's run.c hard-codes 10000, so this model cannot "
                        "be exported to it")


def write_llama2c(model, out: Path, version: int) -> int:
    """Write `model` (our Transformer) as a llama2.c version 0 or 1 file; returns the byte count."""
    cfg = model.cfg
    _check_llama2c_compatible(cfg)
    if version not in (0, 1):
        raise UserError(f"--version {version}: llama2.c fp32 formats are 0 (legacy, what run.c reads) and 1")
    sd = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}
    shared = bool(cfg.tie_embeddings) or torch.equal(sd["tok_embeddings.weight"], sd["output.weight"])
    p = {"dim": cfg.dim, "hidden_dim": cfg.ffn_dim, "n_layers": cfg.n_layers, "n_heads": cfg.n_heads,
         "n_kv_heads": cfg.kv_heads, "vocab_size": cfg.vocab_size, "seq_len": cfg.max_seq_len}
    order = "v0" if version == 0 else "v1"
    cos, sin = llama2c_rope_tables(cfg.head_dim, cfg.max_seq_len)
    tables = iter([cos, sin])
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    n = 0
    try:
        with open(tmp, "wb") as f:
            vals = [p[k] for k in ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len")]
            if version == 0:
                if not shared:
                    vals[5] = -vals[5]
                f.write(struct.pack("<7i", *vals))
            else:
                header = struct.pack("<Ii", MAGIC, 1) + struct.pack("<7i", *vals) + struct.pack("<B", int(shared))
                f.write(header + b"\0" * (V1_HEADER_BYTES - len(header)))
            for name, shape in _weight_shapes(p, order, shared):
                t = sd[name] if name else next(tables)
                assert tuple(t.shape) == tuple(shape), (name, t.shape, shape)
                f.write(t.numpy().astype("<f4", copy=False).tobytes())
            n = f.tell()
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    return n


def sentencepiece_to_llama2c_bin(model_path: Path) -> bytes:
    """A SentencePiece model in llama2.c's tokenizer.bin format (as llama2.c's tokenizer.py export writes it)."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(model_path))
    tokens, scores = [], []
    for i in range(sp.vocab_size()):
        t = sp.id_to_piece(i)
        if i == sp.bos_id():
            t = "\n<s>\n"
        elif i == sp.eos_id():
            t = "\n</s>\n"
        tokens.append(t.replace("\u2581", " ").encode("utf-8"))
        scores.append(sp.get_score(i))
    parts = [struct.pack("<I", max(len(t) for t in tokens))]
    for b, s in zip(tokens, scores):
        parts.append(struct.pack("<fI", s, len(b)))
        parts.append(b)
    return b"".join(parts)


# --------------------------------------------------------------------------------------------- import


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _prepare_out_dir(out: Path, force: bool, what: str) -> None:
    if out.exists() or out.is_symlink():
        if not force:
            raise UserError(f"{out} already exists; pass --force to replace it")
        if not out.is_dir():
            raise UserError(f"{out} exists and is not a directory; remove it yourself")
        names = {p.name for p in out.iterdir()}
        if names & {"checkpoints", "metrics.jsonl"}:
            raise UserError(f"{out} is a training run (it has checkpoints/ or metrics.jsonl); refusing to replace it "
                            f"even with --force: choose another --out")
        if names and not names & {"model.safetensors", "config.json", "config.yaml"}:
            raise UserError(f"{out} is a non-empty directory that does not look like a {what}; refusing to replace "
                            "it even with --force")
    if not out.parent.exists():
        out.parent.mkdir(parents=True, exist_ok=True)


def _is_llama2c_model(path: Path) -> bool:
    try:
        read_llama2c(path)
    except UserError:
        return False
    return True


def _is_llama2c_tokenizer(path: Path) -> bool:
    """A complete llama2.c tokenizer.bin: int32 max token length, then (float32 score, int32 length, bytes)*."""
    data = path.read_bytes()
    if len(data) < 4:
        return False
    (max_len,), pos = struct.unpack_from("<i", data), 4
    while pos < len(data):
        if pos + 8 > len(data):
            return False
        (n,) = struct.unpack_from("<i", data, pos + 4)
        if not 0 <= n <= max_len:
            return False
        pos += 8 + n
    return pos == len(data)


def _check_replaceable_file(target: Path, force: bool, looks_right, what: str, hint: str = "") -> None:
    """An existing output file is replaced only with --force, and only when it is what we would write there."""
    if not target.exists():
        return
    if not force:
        raise UserError(f"{target} already exists; pass --force to replace it{hint}")
    if not target.is_file() or not looks_right(target):
        raise UserError(f"{target} exists and is not a {what}; refusing to replace it even with --force")


def _swap_in(tmp: Path, out: Path) -> None:
    """Move the finished temp dir to `out`, replacing an old one only after the new one is complete."""
    from tinystories.core.atomic import swap_in_dir

    swap_in_dir(tmp, out)


def import_llama2c(model_file: str | Path, tokenizer: str | Path, out: str | Path, force: bool = False) -> Path:
    """Convert a llama2.c model file + its tokenizer into a checkpoint directory every command loads."""
    from tinystories.core.config import RunConfig
    from tinystories.data.tokenizer import load_tokenizer
    from tinystories.model.checkpoint import write_checkpoint_dir
    from tinystories.model.transformer import Transformer

    model_file, out = Path(model_file), Path(out)
    _prepare_out_dir(out, force, "checkpoint")
    tok = load_tokenizer(tokenizer)
    model_cfg, sd, info = read_llama2c(model_file)
    if tok.vocab_size != model_cfg["vocab_size"]:
        raise UserError(f"{tok.path}: the tokenizer has {tok.vocab_size} tokens but {model_file.name} has a "
                        f"vocabulary of {model_cfg['vocab_size']}; pass the tokenizer the model was trained with")
    cfg = RunConfig.model_validate({"out_dir": str(out), "model": model_cfg})
    model = Transformer(cfg.model)
    model.load_state_dict(sd, strict=True)
    state = {"step": 0, "tokens": 0,
             "source": {"format": "llama2c", "version": info["version"], "file": str(model_file.resolve()),
                        "sha256": _sha256(model_file), "tokenizer": str(Path(tok.path).resolve())}}
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write_checkpoint_dir(tmp, model, cfg, tok, state)
        _swap_in(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


# ------------------------------------------------------------------------------------------- HF export


def permute_to_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of wq/wk from interleaved-pair rotary layout to HF's rotate-half layout (convert_llama_weights_to_hf)."""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def permute_from_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def hf_state_dict(model) -> dict[str, torch.Tensor]:
    cfg = model.cfg
    sd = {k: v.detach().to("cpu", torch.float32) for k, v in model.state_dict().items()}
    out = {"model.embed_tokens.weight": sd["tok_embeddings.weight"], "model.norm.weight": sd["norm.weight"]}
    for i in range(cfg.n_layers):
        s, d = f"layers.{i}.", f"model.layers.{i}."
        out[d + "self_attn.q_proj.weight"] = permute_to_hf(sd[s + "attention.wq.weight"], cfg.n_heads)
        out[d + "self_attn.k_proj.weight"] = permute_to_hf(sd[s + "attention.wk.weight"], cfg.kv_heads)
        out[d + "self_attn.v_proj.weight"] = sd[s + "attention.wv.weight"]
        out[d + "self_attn.o_proj.weight"] = sd[s + "attention.wo.weight"]
        out[d + "mlp.gate_proj.weight"] = sd[s + "feed_forward.w1.weight"]
        out[d + "mlp.up_proj.weight"] = sd[s + "feed_forward.w3.weight"]
        out[d + "mlp.down_proj.weight"] = sd[s + "feed_forward.w2.weight"]
        out[d + "input_layernorm.weight"] = sd[s + "attention_norm.weight"]
        out[d + "post_attention_layernorm.weight"] = sd[s + "ffn_norm.weight"]
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = sd["output.weight"]
    return {k: v.contiguous().clone() for k, v in out.items()}


def _hf_token_ids(tok) -> tuple[int, list[int]]:
    """(bos, eos list) for HF: eos are our stop ids, the primary one first (EOS for SentencePiece)."""
    bos = tok.doc_start_id
    stops = sorted(tok.stop_ids)
    if tok.kind == "sentencepiece":
        eos = tok.sp.eos_id()
        if eos >= 0:
            stops = [eos] + [s for s in stops if s != eos]
    return bos, stops


def sentencepiece_to_hf_tokenizer(tok):
    """A `tokenizers.Tokenizer` that encodes and decodes like the SentencePiece model (BPE or unigram, byte fallback).

    Built the way transformers' LlamaConverter builds Llama's tokenizer.json (legacy normalizer: prepend "▁",
    spaces to "▁"; BPE merges ordered by the merged piece's score), plus SentencePiece's remove_extra_whitespaces
    normalization (drop leading/trailing spaces, collapse runs of spaces), which Llama 2's tokenizer turns off but
    llama2.c's small tokenizers keep on."""
    from sentencepiece import sentencepiece_model_pb2 as pb
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers

    proto = pb.ModelProto()
    proto.ParseFromString(Path(tok.path).read_bytes())
    spec, norm = proto.trainer_spec, proto.normalizer_spec
    if norm.precompiled_charsmap:
        raise UserError(f"{tok.path}: SentencePiece models with a normalization charsmap (e.g. nfkc) cannot be "
                        "exported to Hugging Face yet")
    if spec.treat_whitespace_as_suffix or not norm.add_dummy_prefix:
        raise UserError(f"{tok.path}: this SentencePiece whitespace setting is not supported by the Hugging Face "
                        "export")
    pieces = [(p.piece, p.score, p.type) for p in proto.pieces]
    unk = spec.unk_piece if spec.unk_id >= 0 else None
    if spec.model_type == 2:  # BPE
        vocab = {piece: i for i, (piece, _, _) in enumerate(pieces)}
        mergeable = {piece for piece, _, kind in pieces if kind == 1}  # normal pieces (not control/byte/unk)
        merges = []
        for piece, score, kind in pieces:
            if kind != 1:
                continue
            for cut in range(1, len(piece)):
                left, right = piece[:cut], piece[cut:]
                if left in mergeable and right in mergeable:
                    merges.append((-score, vocab[left], vocab[right], left, right))
        merges = [(m[3], m[4]) for m in sorted(merges)]
        model = models.BPE(vocab, merges, unk_token=unk, fuse_unk=True, byte_fallback=spec.byte_fallback)
    elif spec.model_type == 1:  # unigram
        model = models.Unigram([(piece, score) for piece, score, _ in pieces], spec.unk_id if unk else None,
                               spec.byte_fallback)
    else:
        raise UserError(f"{tok.path}: only BPE and unigram SentencePiece models can be exported to Hugging Face")
    fast = Tokenizer(model)
    fast.add_special_tokens([AddedToken(piece, normalized=False, special=True)
                             for piece, _, kind in pieces if kind in (2, 3)])
    steps = []
    if norm.remove_extra_whitespaces:
        # spaces only, not newlines
        steps += [normalizers.Replace(Regex(r"\A +| +\z"), ""), normalizers.Replace(Regex(" {2,}"), " ")]
    steps += [normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")]
    fast.normalizer = normalizers.Sequence(steps)
    fast.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                      decoders.Strip(content=" ", left=1, right=0)])
    return fast


def _hf_tokenizer(tok, max_len: int):
    """A transformers fast tokenizer that encodes like ours; `tokenizer(text)` puts the start-of-story token first,
    as the model saw stories in training (add_special_tokens=False gives the bare text tokens)."""
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    if tok.kind == "bpe":
        fast = Tokenizer.from_file(str(tok.path))
        start = tok.id_to_piece(tok.doc_start_id)
        if start == "<|endoftext|>":
            special = {"bos_token": start, "eos_token": start, "unk_token": start, "pad_token": start}
        else:
            special = {"bos_token": start, "eos_token": "</s>", "pad_token": "</s>"}
    else:
        fast = sentencepiece_to_hf_tokenizer(tok)
        sp = tok.sp
        special = {name: sp.id_to_piece(i) for name, i in (("bos_token", sp.bos_id()), ("eos_token", sp.eos_id()),
                                                            ("unk_token", sp.unk_id())) if i >= 0}
        start = special["bos_token"]
    fast.post_processor = processors.TemplateProcessing(
        single=f"{start} $A", pair=f"{start} $A {start} $B:1", special_tokens=[(start, tok.doc_start_id)])
    return PreTrainedTokenizerFast(tokenizer_object=fast, clean_up_tokenization_spaces=False, model_max_length=max_len,
                                   **special)


def export_hf(model, tok, out: Path, force: bool = False, card: str | None = None) -> Path:
    """Write a directory that transformers' AutoModelForCausalLM / AutoTokenizer load offline, with `card` as its
    README.md (the Hub's model card)."""
    from safetensors.torch import save_file
    from transformers import GenerationConfig, LlamaConfig

    cfg = model.cfg
    _prepare_out_dir(out, force, "Hugging Face export")
    bos, eos = _hf_token_ids(tok)
    hf_cfg = LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.ffn_dim, num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.kv_heads, head_dim=cfg.head_dim, hidden_act="silu",
        max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta,
        tie_word_embeddings=cfg.tie_embeddings, bos_token_id=bos, eos_token_id=eos[0] if len(eos) == 1 else eos,
        attention_bias=False, mlp_bias=False, architectures=["LlamaForCausalLM"],
    )
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        d = hf_cfg.to_dict()
        for k in ("_name_or_path", "id2label", "label2id", "chunk_size_feed_forward", "problem_type",
                  "output_attentions", "output_hidden_states", "return_dict", "is_encoder_decoder"):
            d.pop(k, None)
        d["torch_dtype"] = "float32"
        d["dtype"] = "float32"
        d.setdefault("rope_theta", cfg.rope_theta)
        (tmp / "config.json").write_text(json.dumps(d, indent=2, sort_keys=True) + "\n")
        save_file(hf_state_dict(model), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        gen = GenerationConfig(bos_token_id=bos, eos_token_id=eos[0] if len(eos) == 1 else eos, pad_token_id=eos[0])
        gen.save_pretrained(str(tmp))
        hf_tok = _hf_tokenizer(tok, cfg.max_seq_len)
        hf_tok.save_pretrained(str(tmp))
        tc_file = tmp / "tokenizer_config.json"
        tc = json.loads(tc_file.read_text())
        tc["tokenizer_class"] = "PreTrainedTokenizerFast"  # the portable name (transformers 4 and 5)
        tc_file.write_text(json.dumps(tc, indent=2) + "\n")
        smap = tmp / "special_tokens_map.json"
        if not smap.exists():
            smap.write_text(json.dumps({k: v for k, v in hf_tok.special_tokens_map.items()}, indent=2) + "\n")
        if card is not None:
            (tmp / "README.md").write_text(card, encoding="utf-8")
        _swap_in(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


# ---------------------------------------------------------------------------------------------- CLI


def _cmd_import(args) -> int:
    raise UserError("name the source format: tinystories import llama2c MODEL.bin --tokenizer TOKENIZER.model --out "
                    "DIR")


def _cmd_import_llama2c(args) -> int:
    out = import_llama2c(args.model, args.tokenizer, args.out, args.force)
    from tinystories.model.checkpoint import read_checkpoint

    ck = read_checkpoint(out)
    m = ck.cfg.model
    print(f"imported {args.model} -> {out}")
    print(f"  dim={m.dim} layers={m.n_layers} heads={m.n_heads} kv_heads={m.kv_heads} hidden={m.ffn_dim} "
          f"vocab={m.vocab_size} ctx={m.max_seq_len} tied={m.tie_embeddings}")
    print(f"  try: tinystories generate --checkpoint {out} --prompt 'Once upon a time'")
    return 0


def _cmd_export(args) -> int:
    from tinystories.model.checkpoint import load_model

    if args.version is not None and args.format != "llama2c":
        raise UserError("--version applies to --format llama2c only")
    if args.dtype is not None and args.format != "gguf":
        raise UserError("--dtype applies to --format gguf only (hf and llama2c exports are fp32)")
    if args.format == "llama2c" and (args.push_to_hub or args.eval_json):
        raise UserError(f"{'--push-to-hub' if args.push_to_hub else '--eval-json'} applies to --format hf and gguf")
    if not args.push_to_hub and (args.private or args.revision):
        raise UserError(f"{'--private' if args.private else '--revision'} goes with --push-to-hub OWNER/NAME")
    if args.push_to_hub:
        from tinystories.export.hub import check_push

        check_push(args.push_to_hub)  # before the export work
    if args.eval_json:
        from tinystories.export.hub import find_eval_report

        find_eval_report(Path("."), args.eval_json)  # readable and a report, before the export work
    model, ck = load_model(args.checkpoint)
    out = Path(args.out)
    if args.format == "hf":
        from tinystories.export.hub import model_card, push_to_hub

        card = model_card(model, ck, fmt="hf", repo_id=args.push_to_hub, eval_json=args.eval_json)
        export_hf(model, ck.tokenizer, out, args.force, card)
        print(f"exported {ck.path} -> {out} (Hugging Face LlamaForCausalLM, fp32, model card README.md)")
        print(f"  load: AutoModelForCausalLM.from_pretrained({str(out)!r}); "
              f"AutoTokenizer.from_pretrained({str(out)!r})")
        if args.push_to_hub:
            url = push_to_hub(out, args.push_to_hub, args.private, args.revision)
            print(f"pushed {out} to {args.push_to_hub}: {url}")
        return 0
    if args.format == "gguf":
        return _export_gguf(args, model, ck, out)
    version = 0 if args.version is None else args.version
    tok_out = Path(args.tokenizer_out) if args.tokenizer_out else out.with_name("tokenizer.bin")
    if out.is_dir():
        raise UserError(f"{out} is a directory; --format llama2c writes one file, e.g. --out {out / 'model.bin'}")
    if tok_out.resolve() == out.resolve():
        raise UserError(f"--out {out} and the tokenizer file would be the same; pass --tokenizer-out")
    spm = ck.tokenizer.kind == "sentencepiece"
    tok_data = sentencepiece_to_llama2c_bin(Path(ck.tokenizer.path)) if spm else None
    _check_replaceable_file(out, args.force, _is_llama2c_model, "llama2.c model file")
    tok_same = tok_out.is_file() and tok_data is not None and tok_out.read_bytes() == tok_data
    if spm and not tok_same:  # the same tokenizer already there (another export of this model family) is kept
        _check_replaceable_file(tok_out, args.force, _is_llama2c_tokenizer, "llama2.c tokenizer",
                                " (it holds another model's tokenizer: give this one its own --tokenizer-out)")
    _check_llama2c_compatible(model.cfg)
    out.parent.mkdir(parents=True, exist_ok=True)
    n = write_llama2c(model, out, version)
    print(f"exported {ck.path} -> {out} (llama2.c version {version}, {n:,} bytes)")
    if spm:
        if not tok_same:
            from tinystories.core.atomic import write_bytes_atomic

            write_bytes_atomic(tok_out, tok_data)
        print(f"  tokenizer -> {tok_out} (llama2.c tokenizer.bin format{', already there' if tok_same else ''})")
        if version == 0:
            print(f"  run: ./run {out} -z {tok_out}")
    else:
        print("  note: this model uses a byte-level BPE tokenizer; llama2.c's run.c only reads SentencePiece "
              "tokenizers (tokenizer.bin), so run.c cannot decode its output. The weights were exported anyway.")
    return 0



def _export_gguf(args, model, ck, out: Path) -> int:
    from tinystories.export.gguf import export_gguf

    dtype = args.dtype or "f32"
    run_name = ck.path.parent.parent.name if ck.path.parent.name == "checkpoints" else ck.path.name
    name = args.push_to_hub.split("/")[-1] if args.push_to_hub else run_name
    info = export_gguf(model, ck.tokenizer, out, dtype, args.force, name)
    v = info["vocab"]
    kinds = ", ".join(f"{n} {k}" for k, n in sorted(info["tensors"].items()))
    print(f"exported {ck.path} -> {out} (GGUF, llama.cpp architecture llama, {dtype}: {kinds} tensors; "
          f"{info['bytes']:,} bytes)")
    print(f"  tokenizer: {v['model']} vocabulary of {len(v['tokens']):,} tokens (pre-tokenizer {v['pre']}), "
          f"BOS {v['bos']} {v['tokens'][v['bos']]!r}, EOS {v['eos']} {v['tokens'][v['eos']]!r}")
    print(f"  Ollama Modelfile -> {info['modelfile']}")
    print("run it:")
    print(f"  llama-cli -m {out} -p \"Once upon a time\" -n 256   # llama.cpp; newer builds: llama-completion -no-cnv")
    print(f"  ollama create {out.stem} -f {info['modelfile']} && ollama run {out.stem} \"Once upon a time\"")
    if args.push_to_hub:
        import tempfile

        from tinystories.export.hub import model_card, push_to_hub

        card = model_card(model, ck, fmt="gguf", repo_id=args.push_to_hub, gguf_name=out.name, eval_json=args.eval_json)
        with tempfile.TemporaryDirectory(prefix=".push-", dir=out.parent) as stage:
            stage = Path(stage)
            for f in (out, info["modelfile"]):  # hard links: no copy of the weights
                try:
                    os.link(f, stage / f.name)
                except OSError:
                    shutil.copyfile(f, stage / f.name)
            (stage / "README.md").write_text(card, encoding="utf-8")
            url = push_to_hub(stage, args.push_to_hub, args.private, args.revision)
        print(f"pushed {out.name}, {info['modelfile'].name} and a model card to {args.push_to_hub}: {url}")
    return 0
