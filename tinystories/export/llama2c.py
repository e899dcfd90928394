"""llama2.c model files: read one into a checkpoint directory (`tinystories import llama2c`), write a model back
(`tinystories export --format llama2c`), and its tokenizer.bin.

    tinystories import llama2c MODEL.bin --tokenizer TOKENIZER.model --out DIR
    tinystories export --format llama2c --checkpoint CK --out MODEL.bin [--version 0|1]

llama2.c binary formats (all little-endian, weights fp32, row-major, PyTorch `Linear` layout (out, in)):

* version 0 ("legacy"): seven int32 (dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len; a
  negative vocab_size means the classifier is not shared with the embedding), then token embedding, attention
  norms, wq, wk, wv, wo, ffn norms, w1, w2, w3, final norm, the RoPE tables cos and sin (seq_len x head_dim/2
  each), [classifier].
* version 1: a 256-byte header (uint32 magic "ak42" = 0x616b3432, int32 version = 1, the seven int32, uint8
  shared_classifier, zero padding), then attention norms, ffn norms, final norm, token embedding, wq, wk, wv,
  wo, w1, w2, w3, [classifier].

Our model rotates interleaved pairs like llama2.c, so llama2.c weights load unchanged.
"""

from __future__ import annotations

import hashlib
import shutil
import struct
from pathlib import Path

import numpy as np
import torch

from tinystories.core.atomic import atomic_file, swap_in_dir, temp_name
from tinystories.core.errors import UserError
from tinystories.export.outputs import prepare_out_dir

MAGIC = 0x616B3432  # "ak42"
V1_HEADER_BYTES = 256
V0_HEADER_BYTES = 7 * 4
LLAMA2C_NORM_EPS = 1e-5  # run.c hard-codes these two
LLAMA2C_ROPE_THETA = 10000.0
HEADER_KEYS = ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len")
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


def _read_header(path: Path, size: int) -> tuple[dict, int, bool, str, int]:
    """(the seven sizes, version, shared classifier, tensor order "v0"/"v1", offset of the first weight)."""
    with open(path, "rb") as f:
        head = f.read(V1_HEADER_BYTES)
    if len(head) < V0_HEADER_BYTES:
        raise UserError(f"{path}: truncated llama2.c file ({size} bytes, shorter than the {V0_HEADER_BYTES}-byte "
                        "header)")
    (magic,) = struct.unpack("<I", head[:4])
    if magic != MAGIC:
        p = dict(zip(HEADER_KEYS, struct.unpack("<7i", head[:28])))
        shared = p["vocab_size"] > 0
        p["vocab_size"] = abs(p["vocab_size"])
        return p, 0, shared, "v0", V0_HEADER_BYTES
    if len(head) < 4 + 4 + 28 + 1:
        raise UserError(f"{path}: truncated llama2.c file (the version header is incomplete)")
    (version,) = struct.unpack("<i", head[4:8])
    if version != 1:
        what = "int8-quantized (version 2)" if version == 2 else f"version {version}"
        raise UserError(f"{path}: llama2.c {what} files are not supported; export version 0 or 1 (fp32) with "
                        "llama2.c's export.py")
    p = dict(zip(HEADER_KEYS, struct.unpack("<7i", head[8:36])))
    flag = head[36]
    if flag not in (0, 1):
        raise UserError(f"{path}: impossible llama2.c header (shared_classifier byte is {flag})")
    return p, version, bool(flag), "v1", V1_HEADER_BYTES


def _read_weights(path: Path, shapes: list, offset: int, shared: bool) -> dict[str, torch.Tensor]:
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
    return sd


def read_llama2c(path: str | Path) -> tuple[dict, dict[str, torch.Tensor], dict]:
    """Read a llama2.c model file: (model config dict, state dict, info {version, shared, ...}).

    Raises UserError for anything that is not a complete, consistent version 0 or version 1 file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such llama2.c model file")
    size = path.stat().st_size
    p, version, shared, order, offset = _read_header(path, size)
    _check_header(p, path)
    shapes = _weight_shapes(p, order, shared)
    expected = offset + 4 * sum(int(np.prod(s)) for _, s in shapes)
    if size < expected:
        raise UserError(f"{path}: truncated llama2.c version-{version} file: the header needs {expected:,} bytes, "
                        f"the file has {size:,}")
    if size > expected:
        raise UserError(f"{path}: {size - expected:,} bytes more than a llama2.c version-{version} file with this "
                        f"header ({expected:,}); wrong header or not a llama2.c fp32 file")
    sd = _read_weights(path, shapes, offset, shared)
    model_cfg = {"vocab_size": p["vocab_size"], "dim": p["dim"], "n_layers": p["n_layers"], "n_heads": p["n_heads"],
                 "n_kv_heads": p["n_kv_heads"], "hidden_dim": p["hidden_dim"], "max_seq_len": p["seq_len"],
                 "tie_embeddings": shared, "norm_eps": LLAMA2C_NORM_EPS, "rope_theta": LLAMA2C_ROPE_THETA}
    return model_cfg, sd, {"version": version, "shared_classifier": shared, "bytes": size}


def is_llama2c_model(path: Path) -> bool:
    try:
        read_llama2c(path)
    except UserError:
        return False
    return True


def is_llama2c_tokenizer(path: Path) -> bool:
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


# ------------------------------------------------------------------------------------------- llama2.c write


def llama2c_rope_tables(head_dim: int, seq_len: int,
                        theta: float = LLAMA2C_ROPE_THETA) -> tuple[torch.Tensor, torch.Tensor]:
    """The RoPE tables exactly as llama2.c's model.py precompute_freqs_cis computes them (legacy export)."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2)[: head_dim // 2].float() / head_dim))
    t = torch.arange(seq_len, device=freqs.device)
    freqs = torch.outer(t, freqs).float()
    return torch.cos(freqs), torch.sin(freqs)


def check_llama2c_compatible(cfg) -> None:
    if cfg.norm_eps != LLAMA2C_NORM_EPS:
        raise UserError(f"model.norm_eps={cfg.norm_eps}: llama2.c's run.c hard-codes 1e-5, so this model cannot be "
                        "exported to it")
    if cfg.rope_theta != LLAMA2C_ROPE_THETA:
        raise UserError(f"model.rope_theta={cfg.rope_theta}: llama2.c's run.c hard-codes 10000, so this model cannot "
                        "be exported to it")


def _header_bytes(p: dict, version: int, shared: bool) -> bytes:
    vals = [p[k] for k in HEADER_KEYS]
    if version == 0:
        if not shared:
            vals[5] = -vals[5]
        return struct.pack("<7i", *vals)
    header = struct.pack("<Ii", MAGIC, 1) + struct.pack("<7i", *vals) + struct.pack("<B", int(shared))
    return header + b"\0" * (V1_HEADER_BYTES - len(header))


def write_llama2c(model, out: Path, version: int) -> int:
    """Write `model` (our Transformer) as a llama2.c version 0 or 1 file (atomically); returns the byte count."""
    cfg = model.cfg
    check_llama2c_compatible(cfg)
    if version not in (0, 1):
        raise UserError(f"--version {version}: llama2.c fp32 formats are 0 (legacy, what run.c reads) and 1")
    sd = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}
    shared = bool(cfg.tie_embeddings) or torch.equal(sd["tok_embeddings.weight"], sd["output.weight"])
    p = {"dim": cfg.dim, "hidden_dim": cfg.ffn_dim, "n_layers": cfg.n_layers, "n_heads": cfg.n_heads,
         "n_kv_heads": cfg.kv_heads, "vocab_size": cfg.vocab_size, "seq_len": cfg.max_seq_len}
    tables = iter(llama2c_rope_tables(cfg.head_dim, cfg.max_seq_len))  # cos, sin: version 0 only
    with atomic_file(out, "wb") as f:
        f.write(_header_bytes(p, version, shared))
        for name, shape in _weight_shapes(p, "v0" if version == 0 else "v1", shared):
            t = sd[name] if name else next(tables)
            assert tuple(t.shape) == tuple(shape), (name, t.shape, shape)
            f.write(t.numpy().astype("<f4", copy=False).tobytes())
        n = f.tell()
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


def import_llama2c(model_file: str | Path, tokenizer: str | Path, out: str | Path, force: bool = False) -> Path:
    """Convert a llama2.c model file + its tokenizer into a checkpoint directory every command loads."""
    from tinystories.core.config import RunConfig
    from tinystories.data.tokenizer import load_tokenizer
    from tinystories.model.checkpoint import write_checkpoint_dir
    from tinystories.model.transformer import Transformer

    model_file, out = Path(model_file), Path(out)
    prepare_out_dir(out, force, "checkpoint")
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
    tmp = temp_name(out)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write_checkpoint_dir(tmp, model, cfg, tok, state)
        swap_in_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
