"""llama2.c import/export and the Hugging Face export, on the real stories260K checkpoint and a 4K-BPE model."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import STORIES260K, TOK512, VALID_HEAD, run_cli


@pytest.fixture(autouse=True, scope="module")
def _offline():
    """transformers must never try the network here; restored afterwards so other tests' subprocesses
    (e.g. the Hub download test) are not told to be offline."""
    saved = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    os.environ.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


from tinystories.cli import main  # noqa: E402
from tinystories.core.config import RunConfig  # noqa: E402
from tinystories.data.tokenizer import load_tokenizer  # noqa: E402
from tinystories.export.hf import permute_from_hf, permute_to_hf  # noqa: E402
from tinystories.export.llama2c import import_llama2c, read_llama2c  # noqa: E402
from tinystories.inference.sampling import SamplingParams, generate_texts, prompt_ids, sample  # noqa: E402
from tinystories.model.checkpoint import load_model, write_checkpoint_dir  # noqa: E402
from tinystories.model.likelihood import encode_documents, likelihood  # noqa: E402
from tinystories.model.transformer import Transformer  # noqa: E402

TOK512_BIN = STORIES260K.parent / "tok512.bin"


def cli(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def s260(tmp_path_factory) -> Path:
    """stories260K imported through the real CLI."""
    out = tmp_path_factory.mktemp("s260") / "ck"
    r = run_cli("import", "llama2c", STORIES260K, "--tokenizer", TOK512, "--out", out)
    assert r.returncode == 0, r.stderr
    assert "dim=64 layers=5 heads=8 kv_heads=4 hidden=172 vocab=512 ctx=512 tied=True" in r.stdout
    return out


def greedy(model, ids, n):
    return [int(s.tokens[0]) for s in sample(model, [ids], SamplingParams(max_new_tokens=n, temperature=0))]


# ------------------------------------------------------------------------------------------- import


def test_stories260k_import_generates_and_scores(s260):
    model, ck = load_model(s260)
    tok = ck.tokenizer
    assert ck.cfg.model.max_seq_len == 512 and ck.cfg.model.norm_eps == 1e-5 and ck.tokenizer.kind == "sentencepiece"
    state = json.loads((s260 / "state.json").read_text())
    assert state["step"] == 0 and state["source"]["format"] == "llama2c" and state["source"]["version"] == 0
    text = generate_texts(model, tok, "", SamplingParams(max_new_tokens=40, temperature=0))[0]["text"]
    assert text.startswith("Once upon a time, there was a little girl named Lily. "
                           "She loved to play outside in the park.")
    doc = VALID_HEAD.read_text(encoding="utf-8").strip()
    stream, n_bytes = encode_documents(tok, [doc])
    res = likelihood(model, stream, n_bytes, window=512)
    assert res["bits_per_byte"] == pytest.approx(1.098, abs=0.002)
    assert res["loss_per_token"] == pytest.approx(1.549, abs=0.003)


def test_export_llama2c_v0_reproduces_the_original_bytes(s260, tmp_path):
    out = tmp_path / "model.bin"
    r = run_cli("export", "--format", "llama2c", "--checkpoint", s260, "--out", out)
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == STORIES260K.read_bytes()  # header, weights and the recomputed RoPE tables
    assert (tmp_path / "tokenizer.bin").read_bytes() == TOK512_BIN.read_bytes()
    # existing output is refused without --force, replaced with it
    code = main(["export", "--format", "llama2c", "--checkpoint", str(s260), "--out", str(out)])
    assert code == 2
    argv = ["export", "--format", "llama2c", "--checkpoint", str(s260), "--out", str(out), "--force", "--version", "1"]
    assert main(argv) == 0
    head = out.read_bytes()[:40]
    assert struct.unpack("<Ii7iB", head[:37]) == (0x616B3432, 1, 64, 172, 5, 8, 4, 512, 512, 1)
    assert out.stat().st_size == 256 + (STORIES260K.stat().st_size - 28 - 2 * 4 * 512 * 4)  # no RoPE tables in v1


def _untied_bpe_checkpoint(tmp_path: Path, tok_dir: Path) -> Path:
    tok = load_tokenizer(tok_dir)
    cfg = RunConfig.model_validate({"model": {"vocab_size": tok.vocab_size, "dim": 64, "n_layers": 2, "n_heads": 4,
                                              "n_kv_heads": 2, "max_seq_len": 96, "tie_embeddings": False}})
    torch.manual_seed(1)
    model = Transformer(cfg.model)
    dest = tmp_path / "untied"
    write_checkpoint_dir(dest, model, cfg, tok, {"step": 0})
    return dest


@pytest.mark.parametrize("version", [0, 1])
@pytest.mark.parametrize("tied", [True, False])
def test_llama2c_round_trip(random_checkpoint, tok4k, tmp_path, capsys, version, tied):
    src = random_checkpoint if tied else _untied_bpe_checkpoint(tmp_path, tok4k)
    out = tmp_path / "m.bin"
    code, stdout, _ = cli(capsys, "export", "--format", "llama2c", "--checkpoint", src, "--out", out,
                          "--version", version)
    assert code == 0 and "run.c only reads SentencePiece" in stdout  # a BPE model: weights exported, with a note
    assert not (tmp_path / "tokenizer.bin").exists()
    (vocab,) = struct.unpack("<i", out.read_bytes()[20:24]) if version == 0 else (None,)
    if version == 0:
        assert (vocab > 0) == tied  # untied classifier = negative vocab_size in v0
    back = tmp_path / "back"
    import_llama2c(out, tok4k, back)
    a, ck_a = load_model(src)
    b, ck_b = load_model(back)
    assert ck_b.cfg.model.tie_embeddings == tied
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    x = torch.randint(0, a.cfg.vocab_size, (2, 50))
    assert torch.equal(a(x)[0], b(x)[0])


# ------------------------------------------------------------------------------------------- import errors


def _header_v0(dim=64, hidden=172, layers=5, heads=8, kv=4, vocab=512, seq=512) -> bytes:
    return struct.pack("<7i", dim, hidden, layers, heads, kv, vocab, seq)


def test_import_rejects_bad_files(tmp_path, capsys):
    data = STORIES260K.read_bytes()
    cases = {
        "truncated.bin": (data[:-100], "truncated llama2.c version-0 file"),
        "oversized.bin": (data + b"\0" * 8, "8 bytes more than a llama2.c version-0 file"),
        "tiny.bin": (data[:10], "shorter than the 28-byte header"),
        "zeroheads.bin": (_header_v0(heads=0) + data[28:], "impossible llama2.c header (n_heads=0)"),
        "indivisible.bin": (_header_v0(dim=60) + data[28:], "not divisible by n_heads"),
        "gqa.bin": (_header_v0(kv=3) + data[28:], "not a multiple of n_kv_heads=3"),
        "huge.bin": (_header_v0(layers=1 << 30) + data[28:], "impossible llama2.c header (n_layers="),
        "v2.bin": (struct.pack("<Ii", 0x616B3432, 2) + b"\0" * 248, "version 2) files are not supported"),
    }
    for name, (content, message) in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        out = tmp_path / f"out-{name}"
        code, _, err = cli(capsys, "import", "llama2c", path, "--tokenizer", TOK512, "--out", out)
        assert code == 2, name
        assert message in err and err.count("\n") == 1, (name, err)
        assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left behind


def test_import_rejects_wrong_tokenizer_and_existing_out(tmp_path, tok4k, capsys):
    code, _, err = cli(capsys, "import", "llama2c", STORIES260K, "--tokenizer", tok4k, "--out", tmp_path / "x")
    assert code == 2 and "the tokenizer has 4096 tokens but stories260K.bin has a vocabulary of 512" in err
    assert not (tmp_path / "x").exists()
    out = tmp_path / "ck"
    assert cli(capsys, "import", "llama2c", STORIES260K, "--tokenizer", TOK512, "--out", out)[0] == 0
    code, _, err = cli(capsys, "import", "llama2c", STORIES260K, "--tokenizer", TOK512, "--out", out)
    assert code == 2 and "already exists; pass --force" in err
    assert cli(capsys, "import", "llama2c", STORIES260K, "--tokenizer", TOK512, "--out", out, "--force")[0] == 0
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    code, _, err = cli(capsys, "import", "llama2c", STORIES260K, "--tokenizer", TOK512, "--out", precious, "--force")
    assert code == 2 and (precious / "notes.txt").read_text() == "keep me"
    # a training run is never replaced, --force or not (its config.yaml would otherwise pass for a checkpoint)
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("model: {}\n")
    (run / "metrics.jsonl").write_text("{}\n")
    for args in (["import", "llama2c", STORIES260K, "--tokenizer", TOK512],
                 ["export", "--format", "hf", "--checkpoint", out]):
        code, _, err = cli(capsys, *args, "--out", run, "--force")
        assert code == 2 and "is a training run" in err
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "config.yaml", "metrics.jsonl"]
    code, _, err = cli(capsys, "import")
    assert code == 2 and "tinystories import llama2c" in err


def test_export_llama2c_replaces_only_its_own_kind_of_file(s260, random_checkpoint, tmp_path, capsys):
    notes = tmp_path / "notes.md"
    notes.write_text("keep me")
    code, _, err = cli(capsys, "export", "--format", "llama2c", "--checkpoint", s260, "--out", notes, "--force")
    assert code == 2 and "is not a llama2.c model file" in err and notes.read_text() == "keep me"
    # two exports of one model into one folder share its tokenizer.bin; another tokenizer there is not replaced
    for version in ("0", "1"):
        code, _, err = cli(capsys, "export", "--format", "llama2c", "--checkpoint", s260, "--version", version,
                           "--out", tmp_path / f"v{version}.bin")
        assert code == 0, err
    assert (tmp_path / "tokenizer.bin").read_bytes() == TOK512_BIN.read_bytes()
    (tmp_path / "tokenizer.bin").write_bytes(TOK512_BIN.read_bytes()[:-1] + b"X")  # another model's tokenizer
    code, _, err = cli(capsys, "export", "--format", "llama2c", "--checkpoint", s260, "--out", tmp_path / "v2.bin")
    assert code == 2 and "--tokenizer-out" in err and not (tmp_path / "v2.bin").exists()
    (tmp_path / "tokenizer.bin").write_text("not a tokenizer")
    code, _, err = cli(capsys, "export", "--format", "llama2c", "--checkpoint", s260, "--out", tmp_path / "v2.bin",
                       "--force")
    assert code == 2 and "is not a llama2.c tokenizer" in err


def test_export_llama2c_refuses_what_run_c_cannot_hold(tmp_path, tok4k, capsys):
    tok = load_tokenizer(tok4k)
    cfg = RunConfig.model_validate({"model": {"vocab_size": tok.vocab_size, "dim": 32, "n_layers": 1, "n_heads": 2,
                                              "max_seq_len": 32, "rope_theta": 500000.0}})
    write_checkpoint_dir(tmp_path / "ck", Transformer(cfg.model), cfg, tok, {"step": 0})
    code, _, err = cli(capsys, "export", "--format", "llama2c", "--checkpoint", tmp_path / "ck",
                       "--out", tmp_path / "m.bin")
    assert code == 2 and "rope_theta=500000.0" in err and not (tmp_path / "m.bin").exists()


def test_permutation_is_the_hf_rotate_half_layout():
    """A rotation of interleaved pairs on our rows equals HF's rotate-half on the permuted rows."""
    torch.manual_seed(0)
    heads, hd, dim = 2, 8, 16
    w = torch.randn(heads * hd, dim)
    x = torch.randn(dim)
    assert torch.equal(permute_from_hf(permute_to_hf(w, heads), heads), w)
    ang = torch.rand(hd // 2)
    q = (w @ x).view(heads, hd // 2, 2)  # interleaved pairs
    ours = torch.stack((q[..., 0] * ang.cos() - q[..., 1] * ang.sin(),
                        q[..., 0] * ang.sin() + q[..., 1] * ang.cos()), -1)
    h = (permute_to_hf(w, heads) @ x).view(heads, hd)
    cos, sin = torch.cat([ang.cos()] * 2), torch.cat([ang.sin()] * 2)
    rot = torch.cat((-h[:, hd // 2:], h[:, : hd // 2]), -1)
    theirs = h * cos + rot * sin
    assert torch.allclose(permute_from_hf(theirs.reshape(-1, 1), heads).view(heads, hd // 2, 2), ours, atol=1e-6)


# ------------------------------------------------------------------------------------------- HF export


def _check_hf(ck_dir: Path, out: Path, capsys, n_new: int = 60):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    code, stdout, err = cli(capsys, "export", "--format", "hf", "--checkpoint", ck_dir, "--out", out)
    assert code == 0, err
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json", "generation_config.json"):
        assert (out / name).is_file(), name
    ours, ck = load_model(ck_dir)
    tok = ck.tokenizer
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["hidden_act"] == "silu"
    assert config["torch_dtype"] == "float32" and config["tie_word_embeddings"] == ck.cfg.model.tie_embeddings
    assert config["num_key_value_heads"] == ck.cfg.model.kv_heads and config["bos_token_id"] == tok.doc_start_id
    hf = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    hf_tok = AutoTokenizer.from_pretrained(str(out))
    lines = VALID_HEAD.read_text(encoding="utf-8").splitlines()
    text = "\n".join(lines[:40])
    ids = hf_tok(text, add_special_tokens=False)["input_ids"]
    assert ids == tok.encode(text)
    assert [tok.encode(t) for t in lines[40:400]] == hf_tok(lines[40:400], add_special_tokens=False)["input_ids"]
    assert hf_tok("Once upon a time")["input_ids"] == prompt_ids(tok, "Once upon a time")  # start token first
    assert hf_tok.decode(ids) == tok.decode(ids)
    x = torch.tensor([[tok.doc_start_id] + ids[: ck.cfg.model.max_seq_len - 1]])
    with torch.no_grad():
        diff = (ours(x)[0] - hf(x).logits).abs().max().item()
    assert diff < 1e-4
    prompt = prompt_ids(tok, "Once upon a time, there was a")
    mine = greedy(ours, prompt, n_new)
    x = torch.tensor([prompt])  # an explicit mask: the BPE's start token is also its pad token
    theirs = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n_new, min_new_tokens=n_new,
                         do_sample=False)[0, len(prompt):].tolist()
    assert mine == theirs
    return hf, hf_tok


def test_hf_export_stories260k(s260, tmp_path, capsys):
    hf, hf_tok = _check_hf(s260, tmp_path / "hf", capsys, n_new=100)
    ids = hf_tok("", return_tensors="pt")["input_ids"]  # just the start-of-story token
    gen = hf.generate(ids, max_new_tokens=30, do_sample=False)  # stops at EOS/BOS per generation_config
    text = hf_tok.decode(gen[0], skip_special_tokens=True)
    assert text.startswith("Once upon a time, there was a little girl named Lily.")


def test_hf_export_bpe_tied_and_untied(random_checkpoint, tok4k, tmp_path, capsys):
    _check_hf(random_checkpoint, tmp_path / "hf-tied", capsys)
    _check_hf(_untied_bpe_checkpoint(tmp_path, tok4k), tmp_path / "hf-untied", capsys)
    code, _, err = cli(capsys, "export", "--format", "hf", "--checkpoint", random_checkpoint,
                       "--out", tmp_path / "hf-tied")
    assert code == 2 and "already exists" in err


def test_read_llama2c_matches_file_layout():
    """The v0 reader's first and last tensors are where llama2.c's legacy export put them."""
    cfg, sd, info = read_llama2c(STORIES260K)
    raw = np.fromfile(STORIES260K, dtype="<f4", offset=28)
    assert info == {"version": 0, "shared_classifier": True, "bytes": STORIES260K.stat().st_size}
    assert torch.equal(sd["tok_embeddings.weight"].flatten(), torch.from_numpy(raw[: 512 * 64].copy()))
    hd = 64 // 8
    norm_end = len(raw) - 2 * 512 * hd // 2
    assert torch.equal(sd["norm.weight"], torch.from_numpy(raw[norm_end - 64 : norm_end].copy()))
