"""GPU smoke test (`pytest -m gpu`): skipped where torch.cuda.is_available() is False.

Trains a small model for a few dozen steps on cuda with bf16 autocast (eager, and compiled when Triton is
installed) through the real CLI, then checks: the loss falls, the metrics carry tokens/s (and MFU where the GPU's
bf16 peak is known), the checkpoint reloads onto the GPU without `_orig_mod.`/`module.` prefixes, and KV-cache
generation on the GPU matches a full forward pass and produces text.
"""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from conftest import TRAIN_HEAD, run_cli

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

STEPS = 40


def _train(tmp_path, tok4k, compile_: bool):
    out = tmp_path / ("compiled" if compile_ else "eager")
    sets = [
        "model.dim=128", "model.n_layers=4", "model.n_heads=4", "model.max_seq_len=128", "model.dropout=0.0",
        "train.batch_size=32", "train.grad_accum=1", f"train.max_steps={STEPS}", "train.lr=3e-3", "train.min_lr=3e-4",
        "train.warmup_steps=5", "train.eval_interval=100000", "train.eval_tokens=8192", "train.log_interval=5",
        "train.checkpoint_interval=100000", "train.device=cuda", "train.dtype=bfloat16", f"train.compile={str(compile_).lower()}",
        f"data.data_dir={tmp_path / 'data'}", f"data.source={TRAIN_HEAD}", f"tokenizer.path={tok4k}",
    ]
    args = ["train", "--config", "configs/cpu.yaml", "--out", str(out)]
    for kv in sets:
        args += ["--set", kv]
    r = run_cli(*args, timeout=600)
    assert r.returncode == 0, f"{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    assert "device cuda:0, bfloat16" in r.stdout, r.stdout[-2000:]
    return out


@pytest.mark.parametrize("compile_", [False, pytest.param(True, marks=pytest.mark.skipif(
    importlib.util.find_spec("triton") is None, reason="torch.compile on GPU needs Triton"))], ids=["eager", "compiled"])
def test_gpu_train_bf16_reload_and_generate(tmp_path, tok4k, compile_):
    from safetensors.torch import load_file

    from tinystories.checkpoint import load_model
    from tinystories.model import KVCache
    from tinystories.sampling import SamplingParams, generate_texts
    from tinystories.train import peak_flops

    run = _train(tmp_path, tok4k, compile_)
    pts = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [p for p in pts if p["kind"] == "train"]
    assert train[-1]["step"] == STEPS
    assert train[-1]["loss"] < train[0]["loss"] - 1.0, [p["loss"] for p in train]
    assert all(p["tokens_per_s"] > 0 for p in train)
    if peak_flops(torch.device("cuda", 0)) is not None:
        assert all(0 < p["mfu"] < 1 for p in train), [p.get("mfu") for p in train]
    val = [p for p in pts if p["kind"] == "val"]
    assert val[-1]["val_loss"] < val[0]["val_loss"]

    ck = run / "checkpoints" / "latest"
    assert not [k for k in load_file(str(ck / "model.safetensors")) if k.startswith(("_orig_mod.", "module."))]
    model, info = load_model(run, device="cuda", prefer="latest")
    assert info.step == STEPS and model.rope.device.type == "cuda"

    # KV cache: prefill + one token at a time gives the logits of a full forward pass
    torch.manual_seed(0)
    x = torch.randint(0, model.cfg.vocab_size, (2, 48), device="cuda")
    with torch.inference_mode():
        full, _ = model(x)
        cache = KVCache.empty(model.cfg, 2, "cuda", next(model.parameters()).dtype)
        parts = [model(x[:, :16], cache=cache)[0]]
        for t in range(16, 48):
            parts.append(model(x[:, t : t + 1], cache=cache)[0])
    torch.testing.assert_close(torch.cat(parts, dim=1).float(), full.float(), atol=2e-3, rtol=2e-3)

    # sampling through the cache on the GPU, several sequences at once
    outs = generate_texts(model, info.tokenizer, "Once upon a time",
                          SamplingParams(max_new_tokens=40, temperature=0.8, seed=1), num_samples=3)
    assert len(outs) == 3
    assert all(o["text"].startswith("Once upon a time") and o["tokens"] > 0 for o in outs)
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() > 0
