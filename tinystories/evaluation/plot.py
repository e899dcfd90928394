"""`tinystories plot RUN_DIR`: train/val loss, bits per byte and learning rate against tokens, as a PNG."""

from __future__ import annotations

from pathlib import Path

from tinystories.core import metrics
from tinystories.core.atomic import atomic_file, ensure_writable_dir
from tinystories.core.errors import UserError


def read_metrics(run_dir: Path) -> list[dict]:
    """The run's metrics.jsonl records (tinystories.core.metrics: a torn last line of a live run is skipped)."""
    points = metrics.read_metrics(run_dir)
    if points is None:
        raise UserError(f"{run_dir}: no metrics.jsonl (is this a run directory made by `tinystories train`?)")
    return points


def plot_run(run_dir: Path, out: Path | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out) if out is not None else Path(run_dir) / "loss.png"
    points = read_metrics(run_dir)
    from matplotlib.backend_bases import FigureCanvasBase

    fig_types = FigureCanvasBase.get_supported_filetypes()
    if out.suffix and out.suffix[1:].lower() not in fig_types:
        raise UserError(f"--out {out}: matplotlib cannot write '{out.suffix}' files; use .png (or one of "
                        f"{', '.join('.' + t for t in sorted(fig_types))})")
    if out.is_dir():
        raise UserError(f"--out {out}: is a directory; give a file name, e.g. --out {out / 'loss.png'}")
    ensure_writable_dir(out.parent, "plot", "--out")
    # a resumed run appends again from its checkpoint's step: keep the last value logged for each step
    train = {p["step"]: p for p in points if p.get("kind") == "train"}
    val = {p["step"]: p for p in points if p.get("kind") == "val"}
    if not train and not val:
        raise UserError(f"{metrics.metrics_path(run_dir)} has no points yet")
    train_pts = [train[s] for s in sorted(train)]
    val_pts = [val[s] for s in sorted(val)]
    fig, (ax_loss, ax_bpb, ax_lr) = plt.subplots(3, 1, figsize=(8, 9), sharex=True)
    if train_pts:
        ax_loss.plot([p["tokens"] for p in train_pts], [p["loss"] for p in train_pts],
                     label="train loss", lw=1, alpha=0.8)
    if val_pts:
        ax_loss.plot([p["tokens"] for p in val_pts], [p["val_loss"] for p in val_pts], "o-", label="val loss", ms=3)
        ax_bpb.plot([p["tokens"] for p in val_pts], [p["val_bpb"] for p in val_pts], "o-", color="C2", ms=3)
        best = min(val_pts, key=lambda p: p["val_bpb"])
        ax_bpb.annotate(f"{best['val_bpb']:.3f}", (best["tokens"], best["val_bpb"]),
                        textcoords="offset points", xytext=(0, 8), ha="center")
    if train_pts:
        ax_lr.plot([p["tokens"] for p in train_pts], [p["lr"] for p in train_pts], color="C3")
    ax_loss.set_ylabel("loss (nats/token)")
    ax_loss.legend()
    ax_bpb.set_ylabel("val bits per byte")
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("tokens")
    for ax in (ax_loss, ax_bpb, ax_lr):
        ax.grid(alpha=0.3)
    fig.suptitle(f"{Path(run_dir).resolve().name}")
    fig.tight_layout()
    try:
        with atomic_file(out, "wb") as f:  # an old plot stays whole until the new one is written
            fig.savefig(f, dpi=110, format=Path(out).suffix.lstrip(".") or "png")
    except OSError as e:
        raise UserError(f"--out {out}: cannot write the plot ({e.strerror or e}); pick another --out") from None
    finally:
        plt.close(fig)
    return out


def _cmd_plot(args) -> int:
    out = plot_run(Path(args.run_dir), Path(args.out) if args.out else None)
    print(f"wrote {out}")
    return 0
