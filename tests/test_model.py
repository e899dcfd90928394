"""The model and the shared sampling function."""

from __future__ import annotations

import pytest
import torch

from conftest import run_cli
from tinystories.core.config import ModelConfig
from tinystories.inference.sampling import (
    SamplingParams,
    StreamDecoder,
    apply_repetition_penalty,
    generate_texts,
    sample,
)
from tinystories.model.transformer import KVCache, Transformer, one_query_attention


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Transformer(ModelConfig(vocab_size=300, dim=64, n_layers=2, n_heads=8, n_kv_heads=4, max_seq_len=48)).eval()


def test_causal_masking(model):
    x = torch.randint(0, 300, (1, 40))
    y = x.clone()
    y[0, 25] = (y[0, 25] + 1) % 300  # change a future token
    a, _ = model(x)
    b, _ = model(y)
    assert torch.allclose(a[0, :25], b[0, :25], atol=1e-6)
    assert not torch.allclose(a[0, 25:], b[0, 25:], atol=1e-3)


def test_kv_cache_matches_full_forward(model):
    x = torch.randint(0, 300, (3, 40))
    full, _ = model(x)
    cache = KVCache.empty(model.cfg, 3, "cpu", torch.float32)
    pieces = [model(x[:, :17], cache=cache)[0], model(x[:, 17:30], cache=cache)[0]]  # prefill, then a chunk
    pieces += [model(x[:, t : t + 1], cache=cache)[0] for t in range(30, 40)]  # one token at a time
    assert torch.allclose(torch.cat(pieces, dim=1), full, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_query_attention_equals_sdpa(dtype):
    """The decoding step's attention (one query per row, grouped heads, a per-row mask) against torch's SDPA."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(3, 8, 1, 16, generator=g).to(dtype)
    k, v = (torch.randn(3, 4, 21, 16, generator=g).to(dtype) for _ in range(2))
    mask = (torch.arange(21)[None, :] <= torch.tensor([20, 5, 0])[:, None])[:, None, None, :]  # rows at 20, 5, 0
    for m in (None, mask):
        want = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=m,
                                                                enable_gqa=True)
        got = one_query_attention(q, k, v, m)
        assert got.dtype == dtype and got.shape == want.shape
        assert torch.allclose(got.float(), want, atol=1e-5 if dtype == torch.float32 else 2e-2)


def test_greedy_with_cache_equals_full_recomputation(model):
    params = SamplingParams(max_new_tokens=100, temperature=0.0)  # runs past the 48-token context: sliding window
    cached = torch.stack([s.tokens for s in sample(model, [[1, 2, 3]], params)])
    recomputed = torch.stack([s.tokens for s in sample(model, [[1, 2, 3]], params, use_cache=False)])
    assert cached.shape[0] == 100
    # identical until the window first slides (the two paths keep different amounts of context after it)
    assert torch.equal(cached[:45], recomputed[:45])


def test_sampling_is_seeded_and_batched(model):
    params = SamplingParams(max_new_tokens=20, temperature=1.0, top_k=20, seed=7)
    a = torch.stack([s.tokens for s in sample(model, [[5, 6]] * 4, params)])
    b = torch.stack([s.tokens for s in sample(model, [[5, 6]] * 4, params)])
    assert torch.equal(a, b) and a.shape == (20, 4)
    assert len({tuple(a[:, i].tolist()) for i in range(4)}) > 1  # the batch rows differ


def test_repetition_penalty_sign_rule():
    logits = torch.tensor([[2.0, -2.0, 1.0, -1.0]])
    seen = torch.tensor([[True, True, False, False]])
    out = apply_repetition_penalty(logits, seen, 2.0)
    assert out.tolist() == [[1.0, -4.0, 1.0, -1.0]]  # positive divided, negative multiplied: both less likely


def test_prompt_longer_than_context_is_an_error(model):
    from tinystories.core.errors import UserError

    with pytest.raises(UserError, match="longer than the model's context"):
        next(sample(model, [[1] * 60], SamplingParams(max_new_tokens=5)))


def test_stream_decoder_never_splits_utf8(tok4k):
    from tinystories.data.tokenizer import load_tokenizer

    tok = load_tokenizer(tok4k)
    text = "Lily said “héllo” — 🐶 ñ!"
    ids = tok.encode(text)
    assert len(ids) > len(text.split())  # multi-byte characters span several byte-level tokens
    dec = StreamDecoder(tok, [tok.doc_start_id])
    pieces = [dec.push(i) for i in ids]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def test_generate_texts_stops_at_end_of_story(random_checkpoint):
    from tinystories.model.checkpoint import load_model

    model, ck = load_model(random_checkpoint)
    outs = generate_texts(model, ck.tokenizer, "Once upon a time", SamplingParams(max_new_tokens=30, seed=3), 2)
    assert len(outs) == 2 and all(o["text"].startswith("Once upon a time") for o in outs)
    assert all(o["tokens"] <= 30 for o in outs)


def test_generate_cli_compiled_equals_eager(random_checkpoint):
    # 200 new tokens in a 128-token context: the window slides (eager re-prefill), then compiled steps resume
    args = ("generate", "--checkpoint", random_checkpoint, "--prompt", "Once upon a time", "--max-new-tokens", "200",
            "--seed", "5", "--num-samples", "2")
    eager, compiled = run_cli(*args), run_cli(*args, "--compile")
    assert eager.returncode == 0 and compiled.returncode == 0, compiled.stderr
    assert compiled.stdout == eager.stdout and eager.stdout.count("--- story") == 2
    # compiled before, not during, the stories
    assert "warning" not in compiled.stderr and "compiled in" in compiled.stderr


def _teacher_forced_logits(model, x: torch.Tensor, prefix: int) -> torch.Tensor:
    """Logits of decoding x one token at a time after a `prefix`-token prompt, through model.decode."""
    cache = model.new_cache(x.size(0))
    pieces = [model.decode(x[:, :prefix], cache)]
    pieces += [model.decode(x[:, t : t + 1], cache) for t in range(prefix, x.size(1))]
    return torch.cat(pieces, dim=1)


def test_compiled_decoding_matches_eager_without_recompiling(model):
    from torch._dynamo.utils import counters

    torch.manual_seed(1)
    compiled = Transformer(model.cfg).eval()
    compiled.load_state_dict(model.state_dict())
    compiled.compile_decoding()
    counters.clear()
    with torch.inference_mode():
        for batch in (1, 3, 2):  # up to the last position of the context
            x = torch.randint(0, 300, (batch, model.cfg.max_seq_len))
            eager = _teacher_forced_logits(model, x, prefix=5)
            assert torch.allclose(_teacher_forced_logits(compiled, x, prefix=5), eager, atol=1e-4)
    assert compiled._compiled_step_ran
    # one graph for batch 1 and one for any other batch size, each serving every position
    assert counters["stats"]["unique_graphs"] <= 2, dict(counters["stats"])


def test_compiled_decoding_falls_back_to_eager(model, monkeypatch, capsys):
    def broken_compile(fn, **kwargs):
        def run(*a, **k):
            raise RuntimeError("InductorError: no working C++ compiler found")
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    fallback = Transformer(model.cfg).eval()
    fallback.load_state_dict(model.state_dict())
    fallback.compile_decoding()
    x = torch.randint(0, 300, (2, 20))
    with torch.inference_mode():
        assert torch.allclose(_teacher_forced_logits(fallback, x, 4), _teacher_forced_logits(model, x, 4), atol=1e-6)
    err = capsys.readouterr().err
    assert "compiled decoding failed (InductorError: no working C++ compiler found)" in err
    assert err.count("warning") == 1 and not fallback.decoding_is_compiled


def _copy(model: Transformer) -> Transformer:
    twin = Transformer(model.cfg).eval()
    twin.load_state_dict(model.state_dict())
    return twin


def test_exported_step_matches_eager_and_is_reused(model, tmp_path, monkeypatch):
    from tinystories.model.exported_step import compile_for_decoding

    monkeypatch.setenv("TINYSTORIES_CACHE", str(tmp_path))
    exported = _copy(model)
    assert compile_for_decoding(exported) == "ahead of time (AOTInductor)"
    assert exported.exported_step.compiled_now and exported.decoding_is_compiled
    with torch.inference_mode():
        for batch in (1, 3):  # every position of the context, one token at a time after a 5-token prompt
            x = torch.randint(0, 300, (batch, model.cfg.max_seq_len))
            eager = _teacher_forced_logits(model, x, prefix=5)
            assert torch.allclose(_teacher_forced_logits(exported, x, prefix=5), eager, atol=1e-4)
        # the server's cache: rows at their own positions, fewer rows than slots
        caches = [m.new_cache(4, slots=True) for m in (model, exported)]
        for m, cache in zip((model, exported), caches):
            for b, n in enumerate((6, 11, 3)):
                m.decode(torch.arange(n)[None] + b, cache.slot(b))
        positions = torch.tensor([6, 11, 3])
        for _ in range(4):
            out = []
            for m, cache in zip((model, exported), caches):
                cache.positions, cache.span, cache.uniform = positions, int(positions.max()) + 1, False
                out.append(m.decode(positions[:, None] % 300, cache))
            assert torch.allclose(out[0], out[1], atol=1e-4)
            positions = positions + 1
    again = _copy(model)  # the same weights: the compiled step is loaded from the cache, not compiled again
    compile_for_decoding(again)
    assert not again.exported_step.compiled_now and again.exported_step.path == exported.exported_step.path
    other = Transformer(model.cfg).eval()  # other weights: another compiled step
    compile_for_decoding(other)
    assert other.exported_step.compiled_now and len(list((tmp_path / "aoti").glob("*.pt2"))) == 2
    exported.exported_step.path.write_bytes(b"not a package")  # damaged: compiled again, not a failure
    repaired = _copy(model)
    assert compile_for_decoding(repaired) == "ahead of time (AOTInductor)" and repaired.exported_step.compiled_now
    x = torch.randint(0, 300, (1, 12))
    with torch.inference_mode():
        assert torch.allclose(_teacher_forced_logits(repaired, x, 4), _teacher_forced_logits(model, x, 4), atol=1e-4)


def test_exported_step_cache_keeps_the_most_recently_used(tmp_path):
    import os

    from tinystories.model.exported_step import prune_cache

    steps = [tmp_path / f"step-{i}.pt2" for i in range(6)]
    for i, p in enumerate(steps):
        p.write_bytes(b"x")
        os.utime(p, (1000 + i, 1000 + i))  # step-5 the most recent
    prune_cache(tmp_path, keep=steps[0], most=3)  # the one just compiled, and the two most recent others
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-0.pt2", "step-4.pt2", "step-5.pt2"]


def test_exported_step_failure_falls_back_to_torch_compile(model, tmp_path, monkeypatch, capsys):
    from tinystories.model import exported_step

    def broken(*a, **k):
        raise RuntimeError("AOTInductor: no working C++ compiler found")

    monkeypatch.setenv("TINYSTORIES_CACHE", str(tmp_path))
    monkeypatch.setattr(exported_step, "_export", broken)
    fallback = _copy(model)
    assert exported_step.compile_for_decoding(fallback) == "torch.compile"
    assert fallback.exported_step is None and fallback._compiled_step is not None
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "ahead of time failed (AOTInductor: no working C++ compiler found)" in err
