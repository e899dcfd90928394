"""Training-recipe study: which recipe learns most per CPU-minute? (docs/training-recipe.md presents it.)

Every arm trains the quickstart's CPU model (configs/cpu.yaml, 4K BPE vocabulary, float32 unless --dtype says
otherwise) on the shared 2 MB train head for the same wall-clock budget, and is scored in bits per byte on the whole
shared validation head (the trainer's final evaluation over every validation token).

Equal wall-clock, measured robustly: first each arm's training speed (ms per optimizer step, evaluation excluded)
is measured in a short run on this machine (`--calib-steps`), as the CPU seconds the trainer's process spends per
step (metrics.jsonl `cpu_s`) over its threads, which other processes on the machine change far less than they
change wall time; then each arm trains for the number of steps its speed buys in the budget. On a quiet machine
this is what `train.max_minutes` does; unlike it, the quality figures stay right when other processes share the
CPU.

`--ref-tokens-per-s X` anchors the budget to another machine instead: the baseline arm (adamw) gets the tokens X
tokens/s buy in the budget, and every other arm its share by its speed relative to the baseline, measured here in
the same conditions. E.g. `--ref-tokens-per-s 1300`: configs/cpu.yaml's fp32 speed on 2 AVX2 cores of an AMD EPYC
(165 steps of 4,096 tokens in 10 minutes), so the study answers for a CPU without bf16 even
when run on a busy machine or one with AMX.

    python benchmarks/recipe_study.py --minutes 5 10 --seeds 1 2 --out /tmp/recipe-study
    python benchmarks/recipe_study.py --arms adamw,muon --minutes 2 --seeds 1 --out /tmp/rs   # a quick look

To study a CPU without native bf16 on one that has it, limit oneDNN (bf16 matmuls) and MKL to AVX2:
    ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 python benchmarks/recipe_study.py ...
(not ATEN_CPU_CAPABILITY=avx2: with torch 2.13 it made compiled training steps return NaN on an AMD EPYC.)

It prints one table row per (arm, budget): mean bits per byte over the seeds and their spread, steps, tokens/s;
writes results.json (every run) and recipe-study.png to --out. Rerunning with the same --out reuses finished runs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import torch

from tinystories.core.machine import cpu_name

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data" / "tinystories"

BASE = {  # the earlier configs/cpu.yaml (its shape and optimizer stated here, so the arms keep their meaning
    # when cpu.yaml adopts a winner), without dropout, run in float32 (a CPU without native bf16)
    "model.dim": "256", "model.n_layers": "6", "model.n_heads": "8", "model.dropout": "0.0",
    "train.optimizer": "adamw", "train.zero_init_residual": "false", "train.lr_schedule": "cosine",
}
D192X4 = {"model.dim": "192", "model.n_layers": "4", "model.n_heads": "6"}
MUON_D192X4 = {"train.optimizer": "muon", **D192X4}
# what sizing.py gives past 4 passes over the data, with configs/cpu.yaml's zero start of wo and w2
RULE = {"model.dropout": "0.1", "train.muon_weight_decay": "0.2", "train.zero_init_residual": "true"}
# name -> --set overrides on top of BASE (and of configs/cpu.yaml)
ARMS: dict[str, dict[str, str]] = {
    "adamw": {},  # the earlier recipe: AdamW lr 2e-3, warmup 100, cosine to 1e-4, batch 16, dim 256 x 6 layers
    "adamw-dropout0.1": {"model.dropout": "0.1"},  # the earlier cpu.yaml exactly
    "adamw-lr4e-3": {"train.lr": "4e-3", "train.min_lr": "2e-4"},
    "adamw-zero-init": {"train.zero_init_residual": "true"},
    "muon": {"train.optimizer": "muon"},
    "muon-zero-init": {"train.optimizer": "muon", "train.zero_init_residual": "true"},
    "muon-lr0.04": {"train.optimizer": "muon", "train.muon_lr": "0.04"},
    "muon-lr0.01": {"train.optimizer": "muon", "train.muon_lr": "0.01"},
    "muon-batch8": {"train.optimizer": "muon", "train.batch_size": "8"},
    "muon-batch32": {"train.optimizer": "muon", "train.batch_size": "32"},
    "muon-warmup20": {"train.optimizer": "muon", "train.warmup_steps": "20"},
    "muon-linear": {"train.optimizer": "muon", "train.lr_schedule": "linear", "train.min_lr": "0"},
    "muon-wsd": {"train.optimizer": "muon", "train.lr_schedule": "wsd", "train.min_lr": "0"},
    "muon-d192x4": MUON_D192X4,
    # around the smaller shape: what carries over from the optimizer, lr, schedule, init, batch, width
    "adamw-d192x4": D192X4,
    "muon-d192x4-lr0.04": {**MUON_D192X4, "train.muon_lr": "0.04"},
    "muon-d192x4-lr0.01": {**MUON_D192X4, "train.muon_lr": "0.01"},
    "muon-d192x4-wsd": {**MUON_D192X4, "train.lr_schedule": "wsd", "train.min_lr": "0"},
    "muon-d192x4-zero-init": {**MUON_D192X4, "train.zero_init_residual": "true"},
    "muon-d192x4-batch32": {**MUON_D192X4, "train.batch_size": "32"},
    "muon-d192x4-batch8": {**MUON_D192X4, "train.batch_size": "8"},
    "muon-d128x4": {"train.optimizer": "muon", "model.dim": "128", "model.n_layers": "4", "model.n_heads": "4"},
    "muon-d192x6": {**MUON_D192X4, "model.n_layers": "6"},
    # the tokenizer: a "10K" BPE (8,094 entries on the 2 MB head) instead of 4K, on the small shape
    "muon-d192x4-vocab10k": {**MUON_D192X4, "tokenizer.vocab_size": "10000"},
    "muon-d256x4": {"train.optimizer": "muon", "model.n_layers": "4"},
    "muon-d320x6": {"train.optimizer": "muon", "model.dim": "320", "model.n_heads": "8"},
    # regularisation where the budget reads the data many times over (bf16, or less data)
    "muon-d192x4-dropout0.05": {**MUON_D192X4, "model.dropout": "0.05"},
    "muon-d192x4-dropout0.1": {**MUON_D192X4, "model.dropout": "0.1"},
    "muon-dropout0.05": {"train.optimizer": "muon", "model.dropout": "0.05"},
    "muon-dropout0.1": {"train.optimizer": "muon", "model.dropout": "0.1"},
    "muon-d320x6-dropout0.1": {"train.optimizer": "muon", "model.dim": "320", "model.n_heads": "8",
                               "model.dropout": "0.1"},
    "muon-d192x4-dropout0.1-wd0.1": {**MUON_D192X4, "model.dropout": "0.1", "train.muon_weight_decay": "0.1"},
    "muon-d192x4-dropout0.1-wd0.2": {**MUON_D192X4, "model.dropout": "0.1", "train.muon_weight_decay": "0.2"},
    "muon-d192x4-dropout0.1-wd0.4": {**MUON_D192X4, "model.dropout": "0.1", "train.muon_weight_decay": "0.4"},
    "muon-d192x4-dropout0.05-wd0.2": {**MUON_D192X4, "model.dropout": "0.05", "train.muon_weight_decay": "0.2"},
    "muon-d192x4-dropout0.1-vocab10k": {**MUON_D192X4, "model.dropout": "0.1", "tokenizer.vocab_size": "10000"},
    "muon-d192x4-dropout0.1-wd0.2-zero-init": {**MUON_D192X4, **RULE},
    # around the rule (dropout 0.1, Muon weight decay 0.2, zero start): the vocabulary, and shapes above 192 x 4
    "muon-d192x4-dropout0.1-wd0.2-zero-init-vocab10k": {**MUON_D192X4, **RULE, "tokenizer.vocab_size": "10000"},
    "muon-d256x4-dropout0.1-wd0.2-zero-init": {"train.optimizer": "muon", "model.n_layers": "4", **RULE},
    "muon-d192x6-dropout0.1-wd0.2-zero-init": {**MUON_D192X4, "model.n_layers": "6", **RULE},
    # weight decay without dropout: dropout's random masks cost ~16% of a bf16 step on CPU
    "muon-d192x4-wd0.2-zero-init": {**MUON_D192X4, **RULE, "model.dropout": "0.0"},
    "muon-d192x4-wd0.4-zero-init": {**MUON_D192X4, **RULE, "model.dropout": "0.0", "train.muon_weight_decay": "0.4"},
    # the order of the windows: each pass over the text once, shuffled, instead of random offsets
    "muon-d192x4-dropout0.1-wd0.2-zero-init-epochs": {**MUON_D192X4, **RULE, "train.windows": "epochs"},
}


def run_cli(args: list[str], log: Path) -> None:
    with open(log, "w") as f:
        r = subprocess.run([sys.executable, "-m", "tinystories", *args], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    if r.returncode:
        raise SystemExit(f"failed ({r.returncode}): tinystories {' '.join(args)}; see {log}")


def train_source(data_dir: Path, train_mb: float | None) -> Path:
    """The text the arms train on: the shared heads, or (--train-mb N) the first N MB of the train head (whole
    stories) beside the whole validation head, as a user with less text would have."""
    if not train_mb:
        return SHARED
    src = data_dir / f"text-{train_mb:g}MB"
    train = src / "TinyStories-train-head.txt"
    if not train.exists():
        src.mkdir(parents=True, exist_ok=True)
        stories = (SHARED / "TinyStories-train-head.txt").read_text().split("<|endoftext|>")
        kept, size = [], 0
        for story in stories:
            size += len(story.encode()) + len("<|endoftext|>")
            if size > train_mb * 1e6:
                break
            kept.append(story)
        (src / "TinyStories-valid-head.txt").write_bytes((SHARED / "TinyStories-valid-head.txt").read_bytes())
        train.write_text("<|endoftext|>".join(kept) + "<|endoftext|>")
    return src


def tokenizer_for(sets: dict[str, str], data_dir: Path, source: Path) -> Path:
    """The arm's BPE tokenizer trained on its train text (4K unless the arm sets tokenizer.vocab_size)."""
    vocab = sets.get("tokenizer.vocab_size", "4096")
    tok = data_dir / f"tokenizer-{vocab}" if source == SHARED else data_dir / f"tokenizer-{vocab}-{source.name}"
    if not (tok / "tokenizer.json").exists():
        run_cli(["tokenizer", "train", "--vocab-size", vocab, "--from", str(source), "--out", str(tok)],
                data_dir / f"{tok.name}.log")
    return tok


def train_args(out: Path, sets: dict[str, str], data_dir: Path, source: Path = SHARED) -> list[str]:
    tok = tokenizer_for(sets, data_dir, source)
    args = ["train", "--config", "configs/cpu.yaml", "--data", str(source), "--out", str(out), "--force"]
    fixed = {"data.data_dir": str(data_dir), "tokenizer.path": str(tok), "train.max_minutes": "null",
             "train.checkpoint_interval": "1000000", "train.eval_interval": "200", "train.log_interval": "5",
             "train.sample_tokens": "1"}
    for k, v in {**fixed, **sets}.items():
        args += ["--set", f"{k}={v}"]
    return args


def train_tokens(run: Path) -> int:
    """The training tokens of the run's cache (its train split)."""
    state = json.loads((run / "checkpoints" / "latest" / "state.json").read_text())
    manifest = json.loads((Path(state["cache_dir"]) / "manifest.json").read_text())
    return int(manifest["splits"]["train"]["tokens"])


def points(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def speed_class(sets: dict[str, str]) -> tuple:
    """The overrides that change the time of a step (shape, batch, optimizer; dropout on or off, not its rate);
    lr, schedule, init and seed don't."""
    timed = {k: v for k, v in sets.items() if k.startswith("model.") or k in (
        "train.batch_size", "train.optimizer", "train.dtype", "train.compile", "tokenizer.vocab_size")}
    if "model.dropout" in timed:
        timed["model.dropout"] = str(float(timed["model.dropout"]) > 0)
    return tuple(sorted(timed.items()))


def calibrate(name: str, sets: dict[str, str], a, data_dir: Path) -> tuple[float, int]:
    """Milliseconds per optimizer step of this arm, training only (median over the logged intervals after the
    first, which includes compilation)."""
    out = a.out / "calib" / name
    done = out / "ms_per_step.json"
    # one calibration per speed class, whichever arm made it (two calibrations of one class differed by up to 7%)
    for other, other_sets in ARMS.items():
        saved_file = a.out / "calib" / other / "ms_per_step.json"
        other_full = {**BASE, "train.dtype": a.dtype, "train.compile": a.compile, **other_sets}
        if saved_file.exists() and speed_class(other_full) == speed_class(sets):
            saved = json.loads(saved_file.read_text())
            return saved["ms"], saved["tokens_per_step"]
    steps = a.calib_steps + 10
    run_cli(train_args(out, {**sets, "train.max_steps": str(steps), "train.eval_tokens": "256"}, data_dir),
            a.out / f"calib-{name}.log")
    tr = [p for p in points(out) if p["kind"] == "train"]
    tokens_per_step = int(tr[-1]["tokens"] / tr[-1]["step"])
    # CPU seconds per step (all threads) over the logged intervals after the first (compilation), divided by the
    # threads: on an idle machine that is the wall time; on a busy one it still is, where wall time is not
    per_step = [(b["cpu_s"] - a["cpu_s"]) / (b["step"] - a["step"]) for a, b in zip(tr[1:], tr[2:])]
    ms = 1000 * statistics.median(per_step) / torch.get_num_threads()
    done.write_text(json.dumps({"ms": ms, "tokens_per_step": tokens_per_step}))
    return ms, tokens_per_step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arms", default=",".join(ARMS), help="comma-separated arm names (default: all)")
    ap.add_argument("--minutes", type=float, nargs="+", default=[5, 10])
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--dtype", default="float32", help="train.dtype for every arm (float32 = no native bf16)")
    ap.add_argument("--compile", default="true", help="train.compile for every arm")
    ap.add_argument("--calib-steps", type=int, default=30)
    ap.add_argument("--steps", type=int, default=None,
                    help="train every arm this many steps, not what the budget buys (a comparison at equal steps, "
                         "filed under the budget with an 'N steps' tag)")
    ap.add_argument("--ref-tokens-per-s", type=float, default=None,
                    help="the baseline's tokens/s on the machine the budget is meant for (default: measured here)")
    ap.add_argument("--train-mb", type=float, default=None,
                    help="train on the first N MB of the train head (default: all of it, ~2 MB)")
    ap.add_argument("--out", type=Path, default=Path("/tmp/recipe-study"))
    ap.add_argument("--report-only", action="store_true",
                    help="print the table and plot of the finished runs in --out; train nothing")
    ap.add_argument("--calibrate-only", action="store_true",
                    help="measure every arm's speed and stop (calibrate while the machine is quiet, train later)")
    a = ap.parse_args()
    names = [n.strip() for n in a.arms.split(",") if n.strip()]
    unknown = [n for n in names if n not in ARMS]
    if unknown:
        raise SystemExit(f"unknown arm(s) {unknown}; known: {', '.join(ARMS)}")
    a.out.mkdir(parents=True, exist_ok=True)
    data_dir = a.out / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    model_name = cpu_name()
    from tinystories.model.device import cpu_has_bf16

    bf16 = "native bf16" if cpu_has_bf16() else "no native bf16 as torch runs it"
    print(f"CPU: {model_name} ({bf16}; torch kernels: {torch.backends.cpu.get_cpu_capability()}, oneDNN ISA limit: "
          f"{os.environ.get('ONEDNN_MAX_CPU_ISA', 'none')}), {os.cpu_count()} cores; dtype {a.dtype}, "
          f"compile {a.compile}")

    results_file = a.out / "results.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else {}
    speed, measured = {}, {}  # arm -> (ms per step here, tokens per step); arms of one speed class share it
    for name in dict.fromkeys(["adamw", *names]):
        sets = {**BASE, "train.dtype": a.dtype, "train.compile": a.compile, **ARMS[name]}
        key = speed_class(sets)
        if key not in measured:
            measured[key] = calibrate(name, sets, a, data_dir)
        speed[name] = measured[key]
        print(f"  {name}: {speed[name][0]:.0f} ms/step here ({speed[name][1]:,} tokens/step)", flush=True)
    if a.calibrate_only:
        return
    base_ms_per_token = speed["adamw"][0] / speed["adamw"][1]
    source = train_source(data_dir, a.train_mb)
    for name in names:
        sets = {**BASE, "train.dtype": a.dtype, "train.compile": a.compile, **ARMS[name]}
        ms, tokens_per_step = speed[name]
        if a.ref_tokens_per_s:  # anchored: this arm's speed relative to the baseline, times the reference speed
            ms = ms * (1000 / a.ref_tokens_per_s) / base_ms_per_token
        for minutes in a.minutes:
            steps = a.steps or max(10, int(minutes * 60_000 / ms))
            tag = (f"|{a.train_mb:g}MB" if a.train_mb else "") + (f"|{a.steps}steps" if a.steps else "")
            for seed in a.seeds:
                key = f"{name}|{minutes:g}|{seed}{tag}"
                if key in results or a.report_only:
                    continue
                out = a.out / "runs" / f"{name}-{minutes:g}min-seed{seed}{tag.replace('|', '-')}"
                run_cli(train_args(out, {**sets, "train.max_steps": str(steps), "train.seed": str(seed),
                                         "train.eval_tokens": "100000000"}, data_dir, source),
                        a.out / f"{out.name}.log")
                pts = points(out)
                val = [p for p in pts if p["kind"] == "val"][-1]
                tr = [p for p in pts if p["kind"] == "train"]
                best = min(p["val_bpb"] for p in pts if p["kind"] == "val" and p["step"] > 0)
                results[key] = {"arm": name, "minutes": minutes, "seed": seed, "steps": steps, "ms_per_step": ms,
                                "bpb": val["val_bpb"], "best_bpb": best, "val_loss": val["val_loss"],
                                "tokens": tr[-1]["tokens"], "train_mb": a.train_mb, "fixed_steps": a.steps,
                                "passes": tr[-1]["tokens"] / train_tokens(out),
                                "tokens_per_s": tr[-1]["tokens"] / (steps * ms / 1000),
                                "anchored": bool(a.ref_tokens_per_s)}
                results_file.write_text(json.dumps(results, indent=1))
                print(f"  {key}: {steps} steps, bpb {val['val_bpb']:.4f}", flush=True)
    report(results, names, a)


# (smaller shape, larger shape) arms with the same recipe: where does the larger one start to win?
CROSSOVERS = [("muon-d192x4", "muon")]


def crossover(results: dict, small: str, large: str) -> str | None:
    """Each shape's bits per byte as a + b ln(tokens), fitted through its mean at each budget (two or more), and
    the budget at which the two lines cross at equal wall-clock (each shape at its own tokens/s): beyond the
    budgets measured this is an extrapolation, and the line says so."""
    import math

    fits = {}
    for arm in (small, large):
        by_budget: dict[float, list[dict]] = {}
        for r in results.values():
            if r["arm"] == arm:
                by_budget.setdefault(r["minutes"], []).append(r)
        if len(by_budget) < 2:
            return None
        xs = [math.log(statistics.mean(r["tokens"] for r in rs)) for rs in by_budget.values()]
        ys = [statistics.mean(r["bpb"] for r in rs) for rs in by_budget.values()]
        mx, my = statistics.mean(xs), statistics.mean(ys)
        b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
        rate = statistics.mean(r["tokens_per_s"] for rs in by_budget.values() for r in rs)
        fits[arm] = (my - b * mx, b, rate, max(by_budget))
    (a1, b1, r1, m1), (a2, b2, r2, m2) = fits[small], fits[large]
    if b2 >= b1:  # the larger shape does not improve faster per doubling of tokens: no crossover ahead
        return f"crossover {small} -> {large}: none ahead (slopes {b1:.4f} vs {b2:.4f} bpb per ln token)"
    # a1 + b1 ln(r1 t) = a2 + b2 ln(r2 t)  ->  ln t
    t = math.exp((a2 - a1 + b2 * math.log(r2) - b1 * math.log(r1)) / (b1 - b2))
    measured = max(m1, m2) * 60
    return (f"crossover {small} -> {large}: at ~{t / 60:.0f} min on this machine, when {large} has seen "
            f"~{r2 * t / 1e6:.1f}M tokens ({small}: {r1 * t / 1e6:.1f}M); fitted a + b ln(tokens) per shape"
            + (f", an extrapolation beyond the {measured / 60:g} minutes measured" if t > measured else ""))


def report(results: dict, names: list[str], a) -> None:
    print(f"\n{'arm':<24} {'budget':>6} {'bpb (mean)':>10} {'spread':>7} {'seeds':>5} {'steps':>6} {'tokens/s':>9} "
          f"{'vs adamw':>8} {'passes':>6} {'best eval':>9}")
    rows = []
    for minutes in a.minutes:
        base = [r["bpb"] for r in results.values() if r["arm"] == "adamw" and r["minutes"] == minutes]
        for name in names:
            rs = [r for r in results.values() if r["arm"] == name and r["minutes"] == minutes
                  and r.get("train_mb") == a.train_mb and r.get("fixed_steps") == a.steps]
            if not rs:
                continue
            bpbs = [r["bpb"] for r in rs]
            mean = statistics.mean(bpbs)
            rel = f"{100 * (mean / statistics.mean(base) - 1):+.1f}%" if base else "-"
            rows.append((name, minutes, mean, max(bpbs) - min(bpbs), len(bpbs)))
            passes = statistics.mean(r.get("passes", float("nan")) for r in rs)
            best = statistics.mean(r.get("best_bpb", float("nan")) for r in rs)
            print(f"{name:<24} {minutes:>5g}m {mean:>10.4f} {max(bpbs) - min(bpbs):>7.4f} {len(bpbs):>5} "
                  f"{rs[0]['steps']:>6} {rs[0]['tokens_per_s']:>9,.0f} {rel:>8} {passes:>6.1f} {best:>9.4f}")
    for small, large in CROSSOVERS:
        line = crossover(results, small, large)
        if line:
            print(line)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 0.35 * len(rows) + 1.5))
    labels = [f"{n} ({m:g} min)" for n, m, *_ in rows]
    ax.barh(range(len(rows)), [r[2] for r in rows], xerr=[r[3] / 2 for r in rows], color="tab:blue")
    ax.set_yticks(range(len(rows)), labels)
    ax.invert_yaxis()
    lo = min(r[2] for r in rows)
    ax.set_xlim(lo - 0.05, max(r[2] for r in rows) + 0.02)
    ax.set_xlabel("bits per byte on the validation head (lower is better; bar = seed spread)")
    ax.set_title(f"Equal wall-clock recipe study (CPU model, {a.dtype}"
                 + (f", first {a.train_mb:g} MB of the train head)" if a.train_mb else ")"))
    fig.tight_layout()
    fig.savefig(a.out / "recipe-study.png", dpi=110)
    print(f"\nresults: {a.out / 'results.json'}; plot: {a.out / 'recipe-study.png'}")


if __name__ == "__main__":
    main()
