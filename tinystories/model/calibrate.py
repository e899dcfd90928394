"""This CPU's matmul peak, measured once and cached, so MFU on a CPU means something.

A CPU has no datasheet figure we can look up: its FLOP rate depends on the cores torch may use, the vector units
(AVX2, AVX-512, AMX) and the dtype (bf16 is fast only with AMX / AVX512-BF16). `cpu_matmul_peak(dtype)` times square
matmuls for about a second and keeps the best rate; the result is cached per machine (CPU model, threads, torch
version, dtype, the instruction set torch may use) in ~/.cache/tinystories/ (or $TINYSTORIES_CACHE), so later runs
pay nothing; a figure measured while the machine was busy (its threads got under 85% of their cores, or the load
average is above half the cores) is not cached.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch

from tinystories.core.atomic import write_text_atomic
from tinystories.core.machine import cpu_name

CALIBRATION_SIZE = 2048  # a 2048^3 matmul: large enough to reach the kernels' steady rate, ~0.1 s on 2 cores


BUSY_SHARE = 0.85  # the measuring threads got less of the CPU than this: the machine was busy, nothing is cached


def machine_key() -> str:
    """What a measured speed depends on besides the thing measured: CPU model, threads, torch version, the
    instruction set torch and oneDNN may use."""
    return (f"{cpu_name()}|{torch.get_num_threads()}|{torch.__version__}|{torch.backends.cpu.get_cpu_capability()}|"
            f"{os.environ.get('ONEDNN_MAX_CPU_ISA', '')}")


def cache_root() -> Path:
    """Where measurements and compiled artifacts of this machine are kept: $TINYSTORIES_CACHE or
    ~/.cache/tinystories."""
    return Path(os.environ.get("TINYSTORIES_CACHE", Path.home() / ".cache" / "tinystories"))


def cached_measure(kind: str, key: str, measure: Callable[[], float],
                   announce: Callable[[], None] | None = None) -> float:
    """`measure()` once per machine and `key`, then read back from ~/.cache/tinystories/ (or $TINYSTORIES_CACHE).
    A figure measured while other work shared the CPU is too low to keep: it is used once and measured again next
    time. `announce()` is called before a measurement (not for a figure read back)."""
    path = cache_root() / f"{kind}-{hashlib.sha256(f'{machine_key()}|{key}'.encode()).hexdigest()[:16]}.json"
    try:
        return float(json.loads(path.read_text())["value"])
    except (OSError, ValueError, KeyError):
        pass
    if announce:
        announce()
    # the load before measuring is other work; after it, it is mostly the measurement's own (a training-step
    # timing keeps both cores of a 2-core machine busy for ~30 s, which lifts the 1-minute load past 1)
    load_before = os.getloadavg()[0]
    cpu0, wall0 = time.process_time(), time.perf_counter()
    # the global random state is left as it was: a run that resumes re-measures when the figure was not cached (a
    # busy machine), and its restored random state must then be the one its dropout and data order continue from
    with torch.random.fork_rng(devices=[]):
        value = measure()
    cpu_share = (time.process_time() - cpu0) / ((time.perf_counter() - wall0) * torch.get_num_threads())
    if cpu_share < BUSY_SHARE or load_before > 0.5 * (os.cpu_count() or 1):
        return value
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, json.dumps({"value": value, "kind": kind, "key": key, "cpu": cpu_name(),
                                            "threads": torch.get_num_threads(), "torch": torch.__version__}))
    except OSError:
        pass  # a read-only home: measure again next time
    return value


def measure_matmul_flops(dtype: torch.dtype, seconds: float = 1.0, n: int = CALIBRATION_SIZE) -> float:
    """Best FLOP/s of n x n x n matmuls in `dtype` on the CPU over about `seconds`."""
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    torch.mm(a, b)  # warm up (oneDNN primitive creation)
    best, t_end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = max(best, 2 * n**3 / (time.perf_counter() - t0))
    return best


def cpu_matmul_peak(dtype: torch.dtype) -> float:
    """This machine's measured matmul FLOP/s in `dtype` (cached after the first call)."""
    return cached_measure("cpu-peak", str(dtype), lambda: measure_matmul_flops(dtype))
