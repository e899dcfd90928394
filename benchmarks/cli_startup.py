"""How long the CLI takes to answer without doing any work: `tinystories --help`, every `tinystories CMD --help`
and an argument error (the target: under 0.5 s each on 2 cores).

    python benchmarks/cli_startup.py [--repeat 3]

Each figure is the best of --repeat wall-clock runs of a fresh `python -m tinystories ...` process (so Python's
own start-up, ~20 ms, is included), plus which heavy modules that process imported (python -X importtime).
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import subprocess
import sys
import time

HEAVY = ("torch", "transformers", "numpy", "tokenizers", "safetensors", "matplotlib", "pydantic", "yaml", "rich",
         "huggingface_hub", "sentencepiece", "fastapi", "uvicorn", "gguf", "llama_cpp")


def run(args: list[str]) -> tuple[float, int, str]:
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "tinystories", *args], capture_output=True, text=True,
                       env={**os.environ, "PYTHONUNBUFFERED": "1"})
    return time.perf_counter() - t0, r.returncode, r.stdout + r.stderr


def heavy_imports(args: list[str]) -> list[str]:
    r = subprocess.run([sys.executable, "-X", "importtime", "-m", "tinystories", *args], capture_output=True, text=True)
    tops = set()
    for line in r.stderr.splitlines():
        m = re.match(r"import time:\s+\d+ \|\s+\d+ \|( *)(\S+)", line)
        if m:
            tops.add(m.group(2).split(".")[0])
    return [h for h in HEAVY if h in tops]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    _, _, out = run(["--help"])
    block = out.split("COMMAND", 2)[-1]
    commands = sorted(set(re.findall(r"^ {4}(\w[\w-]*)\s", block, re.M)) - {"COMMAND"})
    cases = [("tinystories --help", ["--help"])]
    cases += [(f"tinystories {c} --help", [c, "--help"]) for c in commands]
    cases += [("tinystories generate (missing --checkpoint)", ["generate"]),
              ("tinystories train --nope (unknown flag)", ["train", "--nope"])]
    cpu = platform.processor() or platform.machine()
    print(f"CLI start-up, best of {a.repeat} runs each; {os.cpu_count()} CPUs ({cpu}); "
          f"python {platform.python_version()}")
    print(f"{'command':48} {'seconds':>8}  exit  heavy modules imported")
    worst = 0.0
    for label, args in cases:
        times = []
        for _ in range(a.repeat):
            secs, code, _ = run(args)
            times.append(secs)
        best = min(times)
        worst = max(worst, best)
        print(f"{label:48} {best:8.2f}  {code:4d}  {', '.join(heavy_imports(args)) or '-'}")
    print(f"slowest: {worst:.2f} s (target < 0.5 s)")


if __name__ == "__main__":
    main()
