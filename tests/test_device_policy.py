"""The device policy's decision table (tinystories/device.py), by injecting device capabilities: no GPU or
Mac needed. Then the same function on this machine's real CPU, and the float16 pieces (autocast + GradScaler)
really running on it."""

from __future__ import annotations

import pytest
import torch

from tinystories.core.config import TrainConfig
from tinystories.core.errors import UserError
from tinystories.model.device import DeviceCaps, choose_policy, detect_caps

H100 = DeviceCaps("cuda", 0, "NVIDIA H100 80GB HBM3", (9, 0), cuda_bf16=True, platform="linux", triton=True)
A100 = DeviceCaps("cuda", 0, "NVIDIA A100-SXM4-40GB", (8, 0), cuda_bf16=True, platform="linux", triton=True)
T4 = DeviceCaps("cuda", 0, "Tesla T4", (7, 5), cuda_bf16=False, platform="linux", triton=True)
V100 = DeviceCaps("cuda", 1, "Tesla V100-SXM2-16GB", (7, 0), cuda_bf16=False, platform="linux", triton=False)
RTX4090_WIN = DeviceCaps("cuda", 0, "NVIDIA GeForce RTX 4090", (8, 9), cuda_bf16=True, platform="win32", triton=True)
CPU_AVX512BF16 = DeviceCaps("cpu", name="AMD EPYC", cpu_bf16="avx512_bf16", cpu_isa="AVX512", platform="linux")
CPU_AMX = DeviceCaps("cpu", name="Intel Xeon Platinum 8480+", cpu_bf16="amx_bf16", cpu_fp16="amx_fp16",
                     cpu_isa="AVX512", platform="linux")
CPU_AVX2 = DeviceCaps("cpu", name="Intel Core i7-8700", cpu_isa="AVX2", platform="linux")
MAC_M2 = DeviceCaps("mps", name="Apple M2", mps_bf16=True, platform="darwin")
MAC_OLD_OS = DeviceCaps("mps", name="Apple M1", mps_bf16=False, platform="darwin")


def policy(caps, dtype="auto", compile=True):
    return choose_policy(caps, TrainConfig(dtype=dtype, compile=compile))


def test_cuda_with_bf16_gets_bf16_tf32_flash_compiled():
    p = policy(H100)
    assert (p.dtype, p.grad_scaler, p.tf32, p.fused_adamw, p.compile, p.sdpa) == \
        (torch.bfloat16, False, True, True, True, "flash")
    assert p.describe() == ("device cuda:0 (NVIDIA H100 80GB HBM3): bfloat16 autocast, TF32 on, SDPA flash, "
                            "fused AdamW, compiled")
    assert policy(A100).dtype == torch.bfloat16


def test_cuda_without_bf16_gets_fp16_and_a_grad_scaler():
    p = policy(T4)
    assert (p.dtype, p.grad_scaler, p.tf32, p.sdpa) == (torch.float16, True, None, "memory-efficient")
    assert p.describe() == ("device cuda:0 (Tesla T4): float16 autocast + loss scaling (no bf16 on this GPU), "
                            "TF32 n/a, SDPA memory-efficient, fused AdamW, compiled")
    v = policy(V100)  # and no Triton: compile is off, said why
    assert v.grad_scaler and not v.compile
    assert "cuda:1 (Tesla V100-SXM2-16GB)" in v.describe() and "not compiled (Triton is not installed)" in v.describe()


def test_explicit_bf16_on_a_gpu_without_it_is_a_user_error():
    with pytest.raises(UserError, match=r"train.dtype=bfloat16: cuda:0 \(Tesla T4\) has no bfloat16.*float16"):
        policy(T4, "bfloat16")


def test_explicit_dtypes_are_honoured_and_float16_always_scales():
    assert policy(H100, "float16").grad_scaler and policy(H100, "float16").sdpa == "flash"
    p = policy(H100, "float32")
    assert (p.dtype, p.grad_scaler, p.autocast, p.sdpa) == (torch.float32, False, False, "memory-efficient")
    assert p.describe().startswith("device cuda:0 (NVIDIA H100 80GB HBM3): float32 (train.dtype), TF32 on")


def test_windows_turns_compile_off():
    p = policy(RTX4090_WIN)
    assert p.dtype == torch.bfloat16 and not p.compile
    assert p.describe().endswith("not compiled (torch.compile is off on Windows)")


def test_cpu_native_bf16_gets_bf16_and_avx2_gets_float32():
    p = policy(CPU_AVX512BF16)
    assert (p.dtype, p.grad_scaler, p.tf32, p.compile, p.sdpa) == (torch.bfloat16, False, None, True, "cpu flash")
    assert "bfloat16 autocast (native bf16: avx512_bf16)" in p.describe()
    assert policy(CPU_AMX).dtype == torch.bfloat16
    q = policy(CPU_AVX2)
    assert (q.dtype, q.autocast, q.grad_scaler) == (torch.float32, False, False)
    assert q.describe() == ("device cpu (Intel Core i7-8700): float32 (no native bf16 on this CPU, best ISA AVX2), "
                            "TF32 n/a, SDPA cpu flash, fused AdamW, compiled")


def test_explicit_float16_on_cpu_gets_a_grad_scaler():
    p = policy(CPU_AVX2, "float16")
    assert (p.dtype, p.grad_scaler) == (torch.float16, True)
    assert "float16 autocast + loss scaling (train.dtype; no native float16 on this CPU" in p.describe()
    assert "no native float16" not in policy(CPU_AMX, "float16").describe()  # AMX-FP16 has it
    slow = policy(CPU_AVX2, "bfloat16")
    assert slow.dtype == torch.bfloat16 and "no native bf16 on this CPU: slower than float32" in slow.describe()


def test_mps_float32_no_compile():
    p = policy(MAC_M2)
    assert (p.dtype, p.grad_scaler, p.tf32, p.fused_adamw, p.compile, p.sdpa) == \
        (torch.float32, False, None, True, False, "mps")
    assert p.describe().startswith("device mps (Apple M2): float32 (half precision is not faster on MPS")
    assert p.describe().endswith("not compiled (torch.compile is off on MPS)")
    assert policy(MAC_M2, "bfloat16").dtype == torch.bfloat16
    f16 = policy(MAC_M2, "float16")
    assert f16.grad_scaler and not f16.compile
    with pytest.raises(UserError, match="macOS 14"):
        policy(MAC_OLD_OS, "bfloat16")


def test_compile_false_is_never_compiled():
    for caps in (H100, T4, CPU_AVX2, MAC_M2):
        p = policy(caps, compile=False)
        assert not p.compile and p.describe().endswith(", not compiled")


def test_this_machine():
    caps = detect_caps(torch.device("cpu"))
    assert caps.type == "cpu" and caps.name and caps.cpu_isa
    flags = open("/proc/cpuinfo").read().split() if caps.platform == "linux" else []
    assert bool(caps.cpu_bf16) == ("amx_bf16" in flags or "avx512_bf16" in flags)
    p = policy(caps)
    assert p.dtype == (torch.bfloat16 if caps.cpu_bf16 else torch.float32)
    assert p.describe().startswith(f"device cpu ({caps.name}): ")


def test_float16_policy_runs_on_this_cpu():
    """The float16 pieces the policy hands out really work here: autocast computes in fp16 and the GradScaler
    scales the loss, unscales the gradients and skips a step whose gradients overflow."""
    p = policy(detect_caps(torch.device("cpu")), "float16")
    torch.manual_seed(0)
    lin = torch.nn.Linear(8, 8)
    opt = torch.optim.AdamW(lin.parameters(), lr=1e-2)
    scaler = p.make_grad_scaler()
    assert scaler.is_enabled() and scaler.get_scale() == 65536.0
    x = torch.randn(4, 8)
    with p.autocast_ctx():
        y = lin(x)
    assert y.dtype == torch.float16
    before = lin.weight.detach().clone()
    scaler.scale(y.float().pow(2).mean() * 1e30).backward()  # overflows at any scale: inf gradients
    scaler.step(opt)
    scaler.update()
    assert torch.equal(lin.weight, before) and scaler.get_scale() == 32768.0  # step skipped, scale backed off
    opt.zero_grad()
    with p.autocast_ctx():
        loss = lin(x).float().pow(2).mean()
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    assert not torch.equal(lin.weight, before) and torch.isfinite(lin.weight).all()
    assert not policy(detect_caps(torch.device("cpu")), "float32").make_grad_scaler().is_enabled()
