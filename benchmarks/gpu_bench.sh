#!/usr/bin/env bash
# GPU training benchmark of the 23M config (configs/tinystories-23M.yaml), eager vs torch.compile: tokens/s, MFU,
# time per step and peak memory (measured, and the estimate of tinystories/memory.py). Meant to take under 5
# minutes in all on an A100/H100-class GPU (60 steps per mode); not yet run on a GPU.
#
#   benchmarks/gpu_bench.sh                      # 60 steps each, on ../shared/data/tinystories/TinyStories-train-head.txt
#   STEPS=100 DATA=data/raw OUT=/tmp/bench benchmarks/gpu_bench.sh
#
# For each mode it trains STEPS optimizer steps with the real training loop (64 x 4 x 512 = 131k tokens per step,
# train.dtype auto, evaluation and checkpoints pushed out of the way) and reports the median tokens/s, time per step
# and MFU that the loop logs to RUN_DIR/metrics.jsonl (MFU appears when the GPU's bf16 peak is known:
# H100/H200/A100/L4/...), leaving out the first logged interval (allocation, compilation). Peak GPU memory comes
# from benchmarks/train_throughput.py (the same model and micro-batch 64, one process) via
# torch.cuda.max_memory_allocated, next to tinystories/memory.py's estimate for the same shape.
# Without a CUDA GPU it prints a message and exits 0.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
STEPS=${STEPS:-60}
DATA=${DATA:-../shared/data/tinystories/TinyStories-train-head.txt}
OUT=${OUT:-${TMPDIR:-/tmp}/tinystories-gpu-bench}
MODES=${MODES:-"false true"}   # train.compile values

if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "gpu_bench: no CUDA GPU visible to torch (torch.cuda.is_available() is False); nothing to measure, skipping."
    exit 0
fi
if [ ! -e "$DATA" ]; then
    echo "gpu_bench: training text $DATA not found (set DATA=FILE_OR_DIR)" >&2
    exit 2
fi
mkdir -p "$OUT"
"$PY" -c 'import torch; p = torch.cuda.get_device_properties(0); print(f"GPU: {p.name}, {p.total_memory / 2**30:.0f} GiB; torch {torch.__version__}")'
echo "config: configs/tinystories-23M.yaml, $STEPS steps per mode, data $DATA, runs in $OUT"

summary=()
for compile in $MODES; do
    run="$OUT/run-compile-$compile"
    echo "== train.compile=$compile =="
    t0=$(date +%s)
    "$PY" -m tinystories train --config configs/tinystories-23M.yaml --data "$DATA" --out "$run" --force \
        --set data.data_dir="$OUT/data" --set train.max_steps="$STEPS" --set train.compile="$compile" \
        --set train.eval_interval=100000000 --set train.checkpoint_interval=100000000 --set train.log_interval=10 \
        --set train.eval_tokens=65536 --set train.sample_tokens=16 2>&1 | grep -Ev '^\s*$' | tail -n 12
    t1=$(date +%s)
    train_line=$("$PY" - "$run/metrics.jsonl" <<'EOF'
import json, statistics, sys
pts = [json.loads(l) for l in open(sys.argv[1])]
tr = [p for p in pts if p["kind"] == "train"]
steady = tr[1:] or tr  # the first interval includes allocation / compilation
tps = statistics.median(p["tokens_per_s"] for p in steady)
tokens_per_step = tr[-1]["tokens"] / tr[-1]["step"]
mfu = [p["mfu"] for p in steady if "mfu" in p]
mfu_s = f"{statistics.median(mfu):.1%}" if mfu else "n/a (GPU peak unknown)"
print(f"tokens/s {tps:,.0f} | {tokens_per_step / tps * 1000:.0f} ms/step | MFU {mfu_s} | "
      f"final train loss {tr[-1]['loss']:.3f}")
EOF
)
    flag=""
    [ "$compile" = "true" ] && flag="--compile"
    mem_line=$("$PY" - $flag <<'EOF'
import runpy, sys, torch
sys.argv = ["train_throughput.py", "--device", "cuda", "--dim", "448", "--n-layers", "7", "--n-heads", "7",
            "--hidden-dim", "1408", "--vocab-size", "10000", "--seq-len", "512", "--batch-size", "64",
            "--steps", "10", "--warmup", "3", *sys.argv[1:]]
runpy.run_path("benchmarks/train_throughput.py", run_name="__main__")
from tinystories.core.config import ModelConfig, TrainConfig
from tinystories.device_policy import choose_policy, detect_caps
from tinystories.training.memory import estimate_memory
peak = torch.cuda.max_memory_allocated()
dtype = choose_policy(detect_caps(torch.device("cuda", 0)), TrainConfig()).dtype
cfg = ModelConfig(vocab_size=10000, dim=448, n_layers=7, n_heads=7, hidden_dim=1408, max_seq_len=512)
est = estimate_memory(cfg, 64, dtype).total
print(f"peak_memory_gib={peak / 2**30:.2f} GiB (estimate {est / 2**30:.2f}, error {(est - peak) / peak:+.0%})")
EOF
)
    mem=$(echo "$mem_line" | sed -n 's/^peak_memory_gib=//p')
    micro=$(echo "$mem_line" | sed -n 's/^tokens_per_s=//p')
    line="compile=$compile: $train_line | peak memory ${mem} (micro-batch 64 x 512) | isolated step ${micro} tok/s | wall $((t1 - t0))s"
    echo "$line"
    summary+=("$line")
done
echo
echo "== summary (configs/tinystories-23M.yaml, $STEPS steps, 131,072 tokens per step) =="
printf '%s\n' "${summary[@]}"
