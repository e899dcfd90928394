"""Where a command runs and how: the process group (torchrun), the torch device, and the device policy.

Used by train, eval, generate and serve, so that every command reads `--device` / `train.device` and
`train.dtype` the same way.

The device policy: for the device a run trains on, the autocast dtype, loss scaling, TF32, fused AdamW,
torch.compile and the attention kernel, each with the reason it was chosen.

`choose_policy(caps, prefs)` is a pure function of what the device can do (`DeviceCaps`, which a test builds by
hand for a device it does not have; `detect_caps(device)` reads the real machine) and of the run's preferences
(anything with `dtype` and `compile` attributes, e.g. `TrainConfig`). The table it implements:

| device | dtype auto | TF32 | fused AdamW | compile (train.compile: true) | SDPA |
|---|---|---|---|---|---|
| CUDA, compute capability >= 8.0 (A100, H100, L4, RTX 30-50) | bf16 autocast | on | yes | on (needs Triton) | flash |
| CUDA without bf16 (T4, V100, RTX 20, GTX) | fp16 autocast + GradScaler | n/a | yes | on (needs Triton) | mem-eff. |
| CPU with AMX / AVX512-BF16 | bf16 autocast | n/a | yes | on | CPU flash |
| CPU without them (AVX2, ARM) | float32 | n/a | yes | on | CPU flash |
| Apple silicon (MPS) | float32 | n/a | yes | off | MPS |
| Windows (any device) | as above | as above | yes | off | as above |

An explicit `train.dtype` is honoured: float16 anywhere gets a GradScaler (CPU and MPS included); bfloat16 on a
GPU without it is a one-line error (autocast would refuse it), bfloat16 on MPS needs macOS 14. On MPS, float32 is
the default because Apple GPUs have no faster half-precision matmul path through SDPA (bf16 saves memory, not
time). torch.compile is off on MPS (MPSInductor is still incomplete in torch 2.13) and on Windows (inductor needs a
compiler toolchain that is rarely there); elsewhere the trainer falls back to eager when compiling fails.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from tinystories.core.errors import UserError
from tinystories.model.calibrate import cpu_matmul_peak, cpu_name

PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12, "4090": 165e12,
                   "5090": 209e12, "3090": 71e12, "V100": 125e12, "L40": 181e12}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Dist:
    """This process's place in a torchrun job (the defaults: a single process)."""

    rank: int = 0
    local_rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def init_distributed(device_pref: str) -> Dist:
    """Join the torchrun process group (NCCL on CUDA, else gloo); a plain Dist() outside torchrun."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Dist()
    rank, local_rank, world = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    use_cuda = torch.cuda.is_available() and device_pref in ("auto", "cuda")
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return Dist(rank, local_rank, world)


def _mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


def pick_device(pref: str, d: Dist | None = None) -> torch.device:
    """The torch device for `pref` (auto, cpu, cuda, cuda:N, mps); cuda means this rank's GPU under torchrun."""
    local_rank = d.local_rank if d is not None else 0
    if pref == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank)
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if pref.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device {pref!r}: no CUDA GPU is available here (use auto or cpu)")
    if pref == "mps" and not _mps_available():
        raise UserError("device 'mps': Apple's Metal backend is not available here (use auto or cpu)")
    if pref == "cuda":
        return torch.device("cuda", local_rank)
    try:
        return torch.device(pref)
    except RuntimeError:
        raise UserError(f"device {pref!r}: not a torch device (use auto, cpu, cuda, cuda:1 or mps)") from None


def cpu_bf16_feature() -> str:
    """The native-bf16 feature torch can use on this CPU ("amx_bf16", "avx512_bf16"), "" when none: the CPU must
    have it, and neither torch's kernels (ATEN_CPU_CAPABILITY) nor oneDNN's, which run bf16 matmuls
    (ONEDNN_MAX_CPU_ISA), may be limited below AVX-512. `ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2` makes
    a machine with bf16 behave like one without, for measurements."""
    onednn = os.environ.get("ONEDNN_MAX_CPU_ISA", "ALL").upper()
    if not torch.backends.cpu.get_cpu_capability().startswith("AVX512") or not (
            onednn == "ALL" or onednn.startswith(("AVX512", "AVX10"))):
        return ""
    return _cpu_feature("amx_bf16", "avx512_bf16")


def cpu_has_bf16() -> bool:
    """Native bf16 on this CPU (AMX or AVX512-BF16), where bf16 autocast is faster than float32."""
    return bool(cpu_bf16_feature())


@dataclass(frozen=True)
class DeviceCaps:
    """What a device can do, as far as the training policy is concerned."""

    type: str  # cuda | cpu | mps
    index: int | None = None  # cuda:N
    name: str = ""  # "NVIDIA H100 80GB HBM3", "Tesla T4", "AMD EPYC 7B13", "Apple M2"
    cuda_capability: tuple[int, int] | None = None  # (major, minor)
    cuda_bf16: bool = False  # native bfloat16 (compute capability >= 8.0, or ROCm); not the emulated kind
    cpu_bf16: str = ""  # the native-bf16 CPU feature found ("amx_bf16", "avx512_bf16"), "" when none
    cpu_fp16: str = ""  # the native-float16 CPU feature found ("amx_fp16", "avx512_fp16"), "" when none
    cpu_isa: str = ""  # the CPU's best vector ISA as torch sees it ("AVX512", "AVX2", "DEFAULT")
    mps_bf16: bool = False  # macOS 14 or later: MPS has bfloat16
    platform: str = sys.platform  # "linux", "win32", "darwin"
    torch_version: str = torch.__version__
    triton: bool = False  # Triton installed (torch.compile's GPU code generator)

    @property
    def label(self) -> str:
        dev = f"{self.type}:{self.index}" if self.type == "cuda" and self.index is not None else self.type
        return f"{dev} ({self.name})" if self.name else dev


@dataclass(frozen=True)
class DevicePolicy:
    """How a run uses its device, and why."""

    caps: DeviceCaps
    dtype: torch.dtype  # autocast dtype; float32: no autocast
    grad_scaler: bool  # loss scaling (float16)
    tf32: bool | None  # TF32 matmuls: True/False on CUDA, None where it does not apply
    fused_adamw: bool
    compile: bool
    sdpa: str  # the attention kernel SDPA is expected to use: flash | memory-efficient | cpu flash | mps | math
    reasons: dict[str, str] = field(default_factory=dict)  # key (dtype, compile, ...) -> why, where not obvious

    @property
    def autocast(self) -> bool:
        return self.dtype != torch.float32

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    def autocast_ctx(self):
        """The context forward passes run under."""
        return autocast_ctx(torch.device(self.caps.type), self.dtype)

    def make_grad_scaler(self, init_scale: float | None = None) -> torch.amp.GradScaler:
        """A GradScaler for this device, enabled only for float16 (a disabled one passes everything through);
        `init_scale` (train.loss_scale_init): its first loss scale, None for torch's default."""
        kw = {} if init_scale is None else {"init_scale": init_scale}
        return torch.amp.GradScaler(self.caps.type, enabled=self.grad_scaler, **kw)

    def apply(self) -> None:
        """Process-wide math settings: TF32 matmuls on CUDA where the policy says so."""
        if self.caps.type == "cuda" and self.tf32 is not None:
            torch.backends.cuda.matmul.allow_tf32 = self.tf32
            torch.backends.cudnn.allow_tf32 = self.tf32

    def describe(self) -> str:
        """One line: `device cuda:0 (Tesla T4): float16 autocast + loss scaling (no bf16 on this GPU), TF32 n/a,
        SDPA memory-efficient, fused AdamW, compiled`."""
        why = lambda key: f" ({self.reasons[key]})" if key in self.reasons else ""  # noqa: E731
        if self.autocast:
            precision = f"{self.dtype_name} autocast" + (" + loss scaling" if self.grad_scaler else "")
        else:
            precision = "float32"
        tf32 = "TF32 n/a" if self.tf32 is None else f"TF32 {'on' if self.tf32 else 'off'}"
        parts = [precision + why("dtype"), tf32 + why("tf32"), f"SDPA {self.sdpa}",
                 "fused AdamW" if self.fused_adamw else "AdamW (not fused)" + why("fused_adamw"),
                 ("compiled" if self.compile else "not compiled") + why("compile")]
        return f"device {self.caps.label}: " + ", ".join(parts)


def _dtype_choice(caps: DeviceCaps, pref: str) -> tuple[torch.dtype, str]:
    t = caps.type
    if pref == "auto":
        if t == "cuda":
            return (torch.bfloat16, "") if caps.cuda_bf16 else (torch.float16, "no bf16 on this GPU")
        if t == "cpu":
            if caps.cpu_bf16:
                return torch.bfloat16, f"native bf16: {caps.cpu_bf16}"
            limit = os.environ.get("ONEDNN_MAX_CPU_ISA")
            why = f"oneDNN limited to {limit}" if limit else caps.cpu_isa and f"best ISA {caps.cpu_isa}"
            return torch.float32, f"no native bf16 on this CPU{', ' + why if why else ''}"
        if t == "mps":
            return torch.float32, "half precision is not faster on MPS; train.dtype=bfloat16 saves memory"
        return torch.float32, ""
    if pref not in DTYPES:
        raise UserError(f"train.dtype={pref!r}: use auto, float32, bfloat16 or float16")
    dtype = DTYPES[pref]
    if dtype == torch.bfloat16:
        if t == "cuda" and not caps.cuda_bf16:
            raise UserError(f"train.dtype=bfloat16: {caps.label} has no bfloat16; use --set train.dtype=float16 "
                            f"(loss scaling is automatic) or auto")
        if t == "mps" and not caps.mps_bf16:
            raise UserError("train.dtype=bfloat16: MPS has bfloat16 from macOS 14 on; use --set train.dtype=float32 "
                            "or auto")
        if t == "cpu" and not caps.cpu_bf16:
            return dtype, "train.dtype; no native bf16 on this CPU: slower than float32"
    if dtype == torch.float16 and t == "cpu" and not caps.cpu_fp16:
        return dtype, "train.dtype; no native float16 on this CPU: slower than float32"
    return dtype, "train.dtype"


def _compile_choice(caps: DeviceCaps, pref) -> tuple[bool, str]:
    if pref is False or pref == "false":
        return False, ""
    if caps.platform == "win32":
        return False, "torch.compile is off on Windows"
    if caps.type == "mps":
        return False, "torch.compile is off on MPS"
    if caps.type == "cuda" and not caps.triton:
        return False, "Triton is not installed"
    return True, ""


def _sdpa_choice(caps: DeviceCaps, dtype: torch.dtype) -> str:
    if caps.type == "cuda":
        # FlashAttention-2 in PyTorch: compute capability >= 8.0 and half-precision inputs; else the
        # memory-efficient kernel (sm50+, any dtype)
        if caps.cuda_capability and caps.cuda_capability >= (8, 0) and dtype in (torch.float16, torch.bfloat16):
            return "flash"
        return "memory-efficient"
    if caps.type == "cpu":
        return "cpu flash"
    if caps.type == "mps":
        return "mps"
    return "math"


def choose_policy(caps: DeviceCaps, prefs) -> DevicePolicy:
    """The policy for `caps` given `prefs.dtype` (auto | float32 | bfloat16 | float16) and `prefs.compile`
    (true / "auto": compile where it works; false: never)."""
    reasons: dict[str, str] = {}
    dtype, why = _dtype_choice(caps, getattr(prefs, "dtype", "auto"))
    if why:
        reasons["dtype"] = why
    compile_, why = _compile_choice(caps, getattr(prefs, "compile", True))
    if why:
        reasons["compile"] = why
    tf32 = None
    if caps.type == "cuda":
        tf32 = bool(caps.cuda_capability and caps.cuda_capability >= (8, 0))
        if not tf32:
            tf32 = None  # pre-Ampere GPUs have no TF32 units: "n/a"
    fused = caps.type in ("cuda", "cpu", "mps")
    if not fused:
        reasons["fused_adamw"] = f"no fused kernel on {caps.type}"
    return DevicePolicy(caps=caps, dtype=dtype, grad_scaler=dtype == torch.float16, tf32=tf32, fused_adamw=fused,
                        compile=compile_, sdpa=_sdpa_choice(caps, dtype), reasons=reasons)


def _cpu_feature(*names: str) -> str:
    """The first of `names` among this CPU's flags (Linux /proc/cpuinfo), "" when none is found."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return ""
    return next((f for f in names if f in flags), "")


def detect_caps(device: torch.device) -> DeviceCaps:
    """Read the real machine's capabilities for `device`."""
    triton = importlib.util.find_spec("triton") is not None
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        cap = torch.cuda.get_device_capability(index)
        # is_bf16_supported() alone says True on a T4 (bf16 emulated, slow): ask for native support only
        bf16 = bool(torch.version.hip) or cap >= (8, 0)
        return DeviceCaps("cuda", index, torch.cuda.get_device_name(index), tuple(cap), bf16, triton=triton)
    if device.type == "mps":
        mps = torch.backends.mps
        name = mps.get_name() if hasattr(mps, "get_name") else "Apple silicon"
        return DeviceCaps("mps", name=name, mps_bf16=mps.is_macos_or_newer(14, 0), triton=triton)
    return DeviceCaps(device.type, name=cpu_name() if device.type == "cpu" else "",
                      cpu_bf16=cpu_bf16_feature(),
                      cpu_fp16=_cpu_feature("amx_fp16", "avx512_fp16"),
                      cpu_isa=torch.backends.cpu.get_cpu_capability(), triton=triton)


def pick_dtype(pref: str, device: torch.device, caps: DeviceCaps | None = None) -> torch.dtype:
    """train.dtype (auto | float32 | bfloat16 | float16) -> the autocast dtype the device policy chooses."""
    return choose_policy(caps or detect_caps(device), _Prefs(pref, False)).dtype


@dataclass(frozen=True)
class _Prefs:
    dtype: str
    compile: bool


def autocast_ctx(device: torch.device, dtype: torch.dtype):
    """The autocast context for forward passes in `dtype` on `device` (a no-op in float32)."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def peak_flops(device: torch.device, dtype: torch.dtype = torch.bfloat16) -> float | None:
    """Peak matmul FLOP/s for MFU: a known CUDA GPU's dense bf16 datasheet figure; on a CPU this machine's measured
    matmul rate in `dtype` (calibrate.py: about a second, once per machine); else None (no MFU is shown)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in name), None)
    if device.type == "cpu":
        # bf16 has its own (AMX / AVX512-BF16) peak; float16 autocast on a CPU mostly runs float32 kernels
        return cpu_matmul_peak(torch.bfloat16 if dtype == torch.bfloat16 else torch.float32)
    return None
