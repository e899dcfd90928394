"""Unit tests of the optimizer module (no training run): which weights Muon gets, the schedule, the state round trip."""

from __future__ import annotations

import copy

import pytest
import torch

from tinystories.core.config import ModelConfig, TrainConfig
from tinystories.model.transformer import Transformer
from tinystories.training.optim import (
    Optimizers,
    apply_schedule,
    make_optimizer,
    muon_momentum_at,
    split_params,
    zero_init_residual_projections,
)


def _model(tie: bool = True) -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=16,
                                   tie_embeddings=tie))


@pytest.mark.parametrize("tie", [True, False])
def test_split_puts_every_parameter_in_exactly_one_place(tie):
    m = _model(tie)
    matrices, other, vectors = split_params(m)
    ids = [id(p) for p in matrices + other + vectors]
    assert len(ids) == len(set(ids)) == len({id(p) for p in m.parameters()})
    names = {id(p): n for n, p in m.named_parameters()}
    assert sorted(names[id(p)].rsplit(".", 2)[-2] for p in matrices) == sorted(["wq", "wk", "wv", "wo", "w1", "w2",
                                                                               "w3"] * 2)
    assert {names[id(p)] for p in other} == ({"tok_embeddings.weight"} if tie else
                                             {"tok_embeddings.weight", "output.weight"})
    assert all(p.dim() == 1 for p in vectors) and len(vectors) == 2 * 2 + 1  # two norms per block + final norm


def _step(opt, m, x):
    opt.zero_grad()
    logits, _ = m(x)
    logits.float().logsumexp(-1).mean().backward()
    opt.step()


def test_muon_state_round_trip_continues_identically():
    t = TrainConfig(optimizer="muon", lr=1e-3, muon_lr=0.02)
    x = torch.randint(0, 64, (2, 16))
    a = _model()
    opt_a = make_optimizer(a, t, torch.device("cpu"))
    assert isinstance(opt_a, Optimizers) and isinstance(opt_a.optimizers[0], torch.optim.Muon)
    for _ in range(3):
        _step(opt_a, a, x)
    b = copy.deepcopy(a)
    opt_b = make_optimizer(b, t, torch.device("cpu"))
    opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))
    for _ in range(2):
        _step(opt_a, a, x)
        _step(opt_b, b, x)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


def test_muon_state_refuses_adamw_state():
    t = TrainConfig(optimizer="muon")
    m = _model()
    adamw_state = make_optimizer(m, TrainConfig(), torch.device("cpu")).state_dict()
    with pytest.raises(Exception, match="train.optimizer"):
        make_optimizer(m, t, torch.device("cpu")).load_state_dict(adamw_state)


def test_schedule_scales_each_group_from_its_base_lr():
    t = TrainConfig(optimizer="muon", lr=2e-3, muon_lr=0.02, muon_momentum=0.95, muon_momentum_start=0.85,
                    muon_momentum_warmup=100)
    opt = make_optimizer(_model(), t, torch.device("cpu"))
    apply_schedule(opt, 50, 1e-3, t)  # half of train.lr
    muon_g, *adam_gs = opt.param_groups
    assert muon_g["lr"] == pytest.approx(0.01) and muon_g["momentum"] == pytest.approx(0.90)
    assert all(g["lr"] == pytest.approx(1e-3) for g in adam_gs)
    assert muon_momentum_at(100, t) == muon_momentum_at(10**6, t) == 0.95
    assert muon_momentum_at(0, t) == pytest.approx(0.85)


def test_adamw_decays_matrices_and_embeddings_not_norms():
    opt = make_optimizer(_model(), TrainConfig(weight_decay=0.1), torch.device("cpu"))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and all(p.dim() == 2 for p in decay["params"])
    assert no_decay["weight_decay"] == 0.0 and all(p.dim() == 1 for p in no_decay["params"])


def test_zero_init_zeroes_only_residual_projections():
    m = _model()
    zero_init_residual_projections(m)
    for name, p in m.named_parameters():
        assert (p.abs().sum() == 0) == name.endswith(("wo.weight", "w2.weight")), name


def test_float32_muon_follows_torch_muon_and_shares_its_state():
    """Float32Muon (used where bf16 is emulated) is torch's Muon with the orthogonalisation in float32: the same
    updates up to bf16 rounding, and each class loads the other's state."""
    from tinystories.training.optim import Float32Muon

    torch.manual_seed(0)
    w_ref = torch.nn.Parameter(torch.randn(48, 80))
    w = torch.nn.Parameter(w_ref.detach().clone())
    ref = torch.optim.Muon([w_ref], lr=0.02, adjust_lr_fn="original")
    ours = Float32Muon([w], lr=0.02, adjust_lr_fn="original")
    for _ in range(3):
        g = torch.randn(48, 80)
        w_ref.grad, w.grad = g.clone(), g.clone()
        ref.step()
        ours.step()
    diff = (w_ref - w).abs().max().item()
    assert 0 < diff < 2e-3  # three updates of size ~0.02: bf16 rounding of the orthogonalised update, not a bug
    ref.load_state_dict(ours.state_dict())
    ours.load_state_dict(ref.state_dict())
