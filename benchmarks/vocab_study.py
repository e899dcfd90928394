"""Vocabulary study: does a 32K vocabulary starve articles ("a", "an", "the") next to a small custom one?

Trains the same model body (configs/cpu.yaml: dim, layers, heads, context, dropout, optimizer, schedule)
for the same wall-clock budget with each tokenizer; only the vocabulary, and so the embedding matrix,
differs. Custom byte-level BPE tokenizers are trained on the train head by the library
(`ensure_run_data` -> `tinystories.data.prepare.train_tokenizer`); `llama2` is the Llama 2 32K SentencePiece model.
Each arm is then scored with the library's eval (`tinystories.evaluation.evaluate.evaluate`): bits per byte on the
validation head (one document), and statistics of generated stories (`story_stats`) next to real ones.

    python benchmarks/vocab_study.py --minutes 3 --out runs/vocab-study --vocabs 2048,4096,10000,llama2

Writes DIR/<arm>/ (run dir, with its data/ cache and tokenizer), DIR/<arm>/result.json, a markdown table
on stdout, docs/vocab-study.json and docs/vocab-study.png (paths settable with --json / --plot).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
DATA = SHARED / "data" / "tinystories"
TRAIN_TEXT = DATA / "TinyStories-train-head.txt"
VALID_TEXT = DATA / "TinyStories-valid-head.txt"
LLAMA2 = SHARED / "models" / "llama2-tokenizer" / "tokenizer.model"
CONFIG = ROOT / "configs" / "cpu.yaml"
# the periodic validation inside train() counts against the time budget: keep it small (the real score is the
# eval afterwards); everything else comes from configs/cpu.yaml unchanged
EVAL_TOKENS_IN_TRAINING = 8192


def eval_text(out: Path, max_bytes: int) -> Path:
    """The validation head, or its first whole lines up to max_bytes (the same bytes for every tokenizer)."""
    if not max_bytes:
        return VALID_TEXT
    kept, n = [], 0
    for line in VALID_TEXT.read_text(encoding="utf-8").splitlines(keepends=True):
        if n + len(line.encode("utf-8")) > max_bytes and kept:
            break
        kept.append(line)
        n += len(line.encode("utf-8"))
    path = out / f"TinyStories-valid-head-first{max_bytes}B.txt"
    path.write_text("".join(kept), encoding="utf-8")
    return path


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "load average: " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def arm_overrides(arm: str, arm_dir: Path, minutes: float) -> list[str]:
    sets = [f"out_dir={arm_dir}", f"data.source={DATA}", f"data.data_dir={arm_dir / 'data'}",
            f"train.max_minutes={minutes}", "model.vocab_size=0", f"train.eval_tokens={EVAL_TOKENS_IN_TRAINING}"]
    if arm == "llama2":
        sets.append(f"tokenizer.path={LLAMA2}")
    else:
        sets.append(f"tokenizer.vocab_size={int(arm)}")
    return sets


def train_metrics(run_dir: Path) -> dict:
    """Mean training tokens/s (the logged intervals, evaluation excluded) and the wall time of training."""
    points = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train = [p for p in points if p["kind"] == "train"]
    tps = [p["tokens_per_s"] for p in train[1:]] or [p["tokens_per_s"] for p in train]  # first interval: warm-up
    return {"tokens_per_s": sum(tps) / len(tps) if tps else None,
            "train_seconds": points[-1]["time"] if points else None}


def overall_rate(tokens: int, seconds: float | None) -> float | None:
    """Tokens seen / the whole training wall time (budget: warm-up and in-training evaluation included)."""
    return tokens / seconds if seconds else None


def run_arm(arm: str, out: Path, minutes: float, stories: int, max_new_tokens: int, text: Path, log=print) -> dict:
    import torch

    from tinystories.core.config import load_config
    from tinystories.evaluation.evaluate import evaluate
    from tinystories.inference.sampling import SamplingParams
    from tinystories.model.checkpoint import load_model
    from tinystories.training.loop import train

    arm_dir = out / (arm if arm == "llama2" else f"bpe-{arm}")
    for stale in ("checkpoints", "metrics.jsonl"):  # a fresh run each time (the token cache is kept)
        p = arm_dir / stale
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
    cfg = load_config(CONFIG, arm_overrides(arm, arm_dir, minutes))
    load_before = uptime()
    t0 = time.time()
    summary = train(cfg)
    wall_train = time.time() - t0

    model, ck = load_model(arm_dir, "cpu")
    tok = ck.tokenizer
    n_total = model.num_params()
    n_body = model.num_params(non_embedding=True)
    del model
    t1 = time.time()
    ev = evaluate(str(arm_dir), text=str(text), num_stories=stories, reference=str(VALID_TEXT),
                  train_text=str(TRAIN_TEXT), sampling=SamplingParams(max_new_tokens=max_new_tokens), device="cpu",
                  log=log)
    wall_eval = time.time() - t1
    tm = train_metrics(arm_dir)
    st = ev["stories"]
    result = {
        "arm": arm,
        "tokenizer": {"kind": tok.kind, "path": str(tok.path), "requested_vocab": None if arm == "llama2" else int(arm),
                      "vocab_size": tok.vocab_size},
        "params": {"total": n_total, "embedding": n_total - n_body, "non_embedding": n_body,
                   "embedding_share": (n_total - n_body) / n_total},
        "train": {"minutes_budget": minutes, "steps": ck.state["step"], "tokens_seen": ck.state["tokens"],
                  "epochs": ck.state["epoch"],
                  "tokens_per_s": tm["tokens_per_s"] or overall_rate(ck.state["tokens"], tm["train_seconds"]),
                  "tokens_per_s_logged": tm["tokens_per_s"],
                  "tokens_per_s_overall": overall_rate(ck.state["tokens"], tm["train_seconds"]),
                  "train_seconds": tm["train_seconds"],
                  "wall_seconds": wall_train, "final_val_loss_in_training": summary["metrics"].get("val_loss"),
                  "torch_threads": torch.get_num_threads()},
        "eval": {"text": str(text), "tokens": ev["tokens"], "bytes": ev["bytes"],
                 "bytes_per_token": ev["bytes"] / ev["tokens"], "loss_per_token": ev["loss_per_token"],
                 "bits_per_byte": ev["bits_per_byte"], "wall_seconds": wall_eval},
        "stories": {"model": st["model"], "reference": st["reference"], "reference_source": st["reference_source"],
                    "train_vocabulary": st["train_vocabulary"], "sampling": ev["sampling"]},
        "samples": [s["text"] for s in ev["samples"][:3]],
        "load_before": load_before,
        "load_after": uptime(),
    }
    (arm_dir / "result.json").write_text(json.dumps(result, indent=2))
    return result


def fmt(v, f: str) -> str:
    return "-" if v is None else f.format(v)


def table(results: list[dict]) -> str:
    ref = next((r["stories"]["reference"] for r in results if r["stories"]["reference"]), {}) or {}
    head = ("| tokenizer | vocab | bytes/token | embedding params | total params | tokens/s | tokens seen (epochs) "
            "| val bits/byte | articles /100 words | stories with articles | invented words |")
    lines = [head, "|" + "|".join(["---"] * (head.count("|") - 1)) + "|"]
    for r in results:
        name = "Llama 2 SentencePiece" if r["arm"] == "llama2" else f"BPE (asked {r['arm']})"
        m = r["stories"]["model"]
        lines.append(
            f"| {name} | {r['tokenizer']['vocab_size']:,} | {r['eval']['bytes_per_token']:.2f} | "
            f"{r['params']['embedding'] / 1e6:.2f}M ({r['params']['embedding_share']:.0%}) | "
            f"{r['params']['total'] / 1e6:.2f}M | "
            f"{fmt(r['train']['tokens_per_s'], '{:,.0f}')} | "
            f"{r['train']['tokens_seen'] / 1e6:.2f}M ({r['train']['epochs']:.2f}) | "
            f"**{r['eval']['bits_per_byte']:.3f}** | {fmt(m['articles_per_100_words'], '{:.2f}')} | "
            f"{fmt(m['stories_with_articles'], '{:.0%}')} | {fmt(m['invented_words'], '{:.2%}')} |")
    lines.append(f"| real stories (validation head) | | | | | | | | "
                 f"{fmt(ref.get('articles_per_100_words'), '{:.2f}')} | "
                 f"{fmt(ref.get('stories_with_articles'), '{:.0%}')} | {fmt(ref.get('invented_words'), '{:.2%}')} |")
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [("llama2 32K" if r["arm"] == "llama2" else f"BPE {r['tokenizer']['vocab_size']:,}") for r in results]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
    bpb = [r["eval"]["bits_per_byte"] for r in results]
    bars = a1.bar(names, bpb, color="tab:blue")
    a1.bar_label(bars, fmt="%.3f")
    a1.set_ylabel("bits per byte (validation head, lower is better)")
    a1.set_title(f"Likelihood after {results[0]['train']['minutes_budget']:g} min of training each")
    a1.set_ylim(0, max(bpb) * 1.15)
    x = range(len(results))
    w = 0.38
    model = [r["stories"]["model"]["articles_per_100_words"] or 0 for r in results]
    ref = [(r["stories"]["reference"] or {}).get("articles_per_100_words") or 0 for r in results]
    b1 = a2.bar([i - w / 2 for i in x], model, w, label="generated", color="tab:orange")
    b2 = a2.bar([i + w / 2 for i in x], ref, w, label="real stories", color="tab:gray")
    a2.bar_label(b1, fmt="%.1f")
    a2.bar_label(b2, fmt="%.1f")
    a2.set_xticks(list(x), names)
    a2.set_ylabel("articles (a/an/the) per 100 words")
    a2.set_title("Articles: generated stories vs real ones")
    a2.set_ylim(0, max(model + ref) * 1.2)
    a2.legend(loc="lower right")
    fig.suptitle("Same model body (configs/cpu.yaml), same wall-clock budget, different vocabularies", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=3.0, help="training wall-clock budget per arm (default 3)")
    ap.add_argument("--out", default="runs/vocab-study", help="study directory (one run dir per arm)")
    ap.add_argument("--vocabs", default="2048,4096,10000,llama2", help="comma-separated BPE sizes and/or llama2")
    ap.add_argument("--stories", type=int, default=20, help="stories generated per arm for the statistics (default 20)")
    ap.add_argument("--max-new-tokens", type=int, default=200)
    ap.add_argument("--eval-bytes", type=int, default=0,
                    help="score only the first whole lines of the validation head up to this many bytes "
                         "(0 = all of it)")
    ap.add_argument("--json", default=str(ROOT / "docs" / "vocab-study.json"))
    ap.add_argument("--plot", default=str(ROOT / "docs" / "vocab-study.png"))
    ap.add_argument("--reuse", action="store_true",
                    help="reuse an arm's result.json when present (finish an interrupted study)")
    args = ap.parse_args()

    arms = [a.strip() for a in args.vocabs.split(",") if a.strip()]
    for a in arms:
        if a != "llama2" and not a.isdigit():
            ap.error(f"--vocabs: {a!r} is neither a number nor llama2")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    load_start = uptime()
    text = eval_text(out, args.eval_bytes)
    results = []
    for a in arms:
        done = out / (a if a == "llama2" else f"bpe-{a}") / "result.json"
        if args.reuse and done.is_file():
            r = json.loads(done.read_text())
            if r["train"]["minutes_budget"] == args.minutes and r["eval"]["text"] == str(text):
                print(f"== {a}: reusing {done}", flush=True)
                results.append(r)
                continue
        print(f"== {a}: training {args.minutes:g} min ({uptime()})", flush=True)
        results.append(run_arm(a, out, args.minutes, args.stories, args.max_new_tokens, text))
        r = results[-1]
        print(f"== {a}: vocab {r['tokenizer']['vocab_size']}, {r['train']['steps']} steps, "
              f"bpb {r['eval']['bits_per_byte']:.4f}, articles/100w {r['stories']['model']['articles_per_100_words']}",
              flush=True)
    md = table(results)
    report = {
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:]),
        "config": str(CONFIG.relative_to(ROOT)), "minutes_per_arm": args.minutes, "stories_per_arm": args.stories,
        "train_text": str(TRAIN_TEXT), "eval_text": str(text), "eval_bytes": args.eval_bytes,
        "eval_tokens_in_training": EVAL_TOKENS_IN_TRAINING, "cpu_count": os.cpu_count(),
        "load_start": load_start, "load_end": uptime(), "study_seconds": time.time() - started,
        "table_markdown": md, "arms": results,
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2))
    plot(results, Path(args.plot))
    print()
    print(md)
    print(f"\nload: start [{load_start}] end [{report['load_end']}]")
    print(f"wrote {args.json} and {args.plot}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    raise SystemExit(main())
