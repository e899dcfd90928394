"""The fault-injection benchmark's quick mode (benchmarks/chaos.py --quick): kill -9 during training and cache
builds, a full disk (tmpfs, as root), flipped bytes and truncated files, and the server's faults when
benchmarks/chaos_serve.py is there. Every row must have lost nothing; the full run's table is in docs/results.md."""

from __future__ import annotations

import re
import subprocess
import sys

from conftest import REPO


def test_chaos_quick_loses_nothing():
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "chaos.py"), "--quick"], cwd=REPO,
                       capture_output=True, text=True, timeout=1800)
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in r.stdout.splitlines()
            if line.startswith("| ") and not line.startswith(("| fault", "| ---"))]
    faults = [row[0] for row in rows]
    for wanted in ("kill -9 during train", "kill -9 during data prepare", "full disk: checkpoint save",
                   "full disk: cache build", "full disk: export", "full disk: tokenizer save",
                   "corrupt: flipped byte in a token shard", "corrupt: flipped byte in model.safetensors",
                   "corrupt: flipped byte in trainer.pt", "corrupt: flipped byte in tokenizer.json",
                   "corrupt: truncated manifest.json", "corrupt: truncated metrics.jsonl"):
        assert any(f.startswith(wanted) for f in faults), (wanted, r.stdout, r.stderr[-3000:])
    for fault, injected, survived, lost in rows:
        if lost.startswith("not run"):  # the full-disk rows without root (no tmpfs mount)
            continue
        # counts lead the cells: "24", or the server's "81 requests", "81 (43 x 200, ...)" and "81: ..."
        n_injected, n_survived = (int(re.match(r"\d+", cell)[0]) for cell in (injected, survived))
        assert lost == "nothing" and n_injected >= 1 and n_survived == n_injected, (fault, injected, survived, lost)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
