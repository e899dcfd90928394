"""The machine a figure was measured on, named the same way everywhere (torch-free: benchmarks' clients use it)."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path


def cpu_flags_digest() -> str:
    """A short digest of this CPU's feature flags (/proc/cpuinfo): code compiled for this CPU's instruction sets may
    be reused only where it matches (two CPUs can share a model name and differ in AVX-512). "" when unknown."""
    import hashlib

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags = " ".join(sorted(line.split(":", 1)[1].split()))
                return hashlib.sha256(flags.encode()).hexdigest()[:12]
    except OSError:
        pass
    return ""


def cpu_name() -> str:
    """The CPU's model name: lscpu's, else /proc/cpuinfo's, else what the platform says."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10, env={**os.environ, "LC_ALL": "C"})
        for line in out.stdout.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"
