"""Fault injection: does the toolkit keep its promises when things go wrong? One table: fault | injected |
survived | lost.

    python benchmarks/chaos.py            # the full run: about 10 minutes on 2 CPU cores
    python benchmarks/chaos.py --quick    # a few of each (what tests/test_chaos.py runs)

Faults, on small models and the real text in ../shared:
- kill -9 during `train` at random moments, with a checkpoint after every step so that many kills land inside a
  checkpoint write; each followed by `train --resume`. After every kill the `latest` checkpoint must match all its
  recorded checksums (no torn checkpoint is ever there to load); the final weights must equal an uninterrupted
  run's bit for bit (float32), and no half-written checkpoint may be left behind.
- kill -9 during `data prepare` at random moments, each followed by a rerun: the final cache is byte-identical to an
  uninterrupted build, with no temporary file left.
- a full disk (a small tmpfs, mounted here: needs root) during a checkpoint save, a cache build, an export and a
  tokenizer save: each ends in a one-line error naming the path, what was there before stays intact and loadable,
  and the same command completes once space is freed.
- corruption: a flipped byte in a token shard, model.safetensors, trainer.pt and tokenizer.json, a truncated
  manifest.json and metrics.jsonl: each is caught when loaded, in one line naming the file.
- the server's faults, from benchmarks/chaos_serve.py when it is there (`run(quick) -> rows`).

Every process runs one intra-op thread (OMP_NUM_THREADS=1): several share the 2 cores, and spinning thread pools
on an oversubscribed machine are slower by an order of magnitude. The kills use real processes; the full-disk and
corruption faults run the CLI's `main` in this process (the same code path, exit status and stderr, without a
new interpreter each time). Exit status 1 when any row lost something.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch is imported, here and in every child
HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path[:0] = [str(REPO), str(HERE), str(REPO / "tests")]

from procwatch import Lines  # noqa: E402  (waits for what a child prints)

DATA = (REPO / ".." / "shared" / "data" / "tinystories").resolve()
TRAIN_HEAD = DATA / "TinyStories-train-head.txt"
NOTHING = "nothing"
TINY = ["model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.max_seq_len=64",
        "model.dropout=0.1", "train.batch_size=8", "train.warmup_steps=5", "train.lr=3e-3", "train.max_minutes=null",
        "train.log_interval=1", "train.checkpoint_interval=1", "train.eval_interval=100000", "train.eval_tokens=2048",
        "train.sample_tokens=4", "train.dtype=float32", "train.compile=false"]


def row(fault: str, injected: int, survived: int, lost: list[str]) -> dict:
    return {"fault": fault, "injected": str(injected), "survived": str(survived),
            "lost": NOTHING if not lost else "; ".join(lost)}


def cli(*args, timeout: float = 600, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tinystories", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, **kw)


def inproc(*args) -> SimpleNamespace:
    """The CLI's main() run here: its exit status and what it printed; an exception is a traceback, as the CLI's."""
    from tinystories.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main([str(a) for a in args])
        except BaseException:  # noqa: BLE001 - what a user would see as a traceback
            traceback.print_exc(file=err)
            rc = 1
    return SimpleNamespace(returncode=rc, stdout=out.getvalue(), stderr=err.getvalue())


def spawn(*args) -> tuple[subprocess.Popen, Lines]:
    """A CLI process in its own session (so its workers can be waited for), its output followed line by line."""
    proc = subprocess.Popen([sys.executable, "-m", "tinystories", *map(str, args)], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    return proc, Lines(proc)


def kill9(proc: subprocess.Popen) -> None:
    """SIGKILL the process (not its children: they must notice by themselves), then wait until its whole session is
    gone, so that the next run never races a dying worker."""
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # a worker that outlived its parent: a finding, reported by the caller
    raise RuntimeError(f"a child of {proc.args} outlived it by 120 s")


def log(line: str) -> None:
    """What a fault produced, on stderr (the table goes to stdout)."""
    print(f"  {line}", file=sys.stderr, flush=True)


def one_line_error(r: subprocess.CompletedProcess, *needles: str) -> str | None:
    """None when `r` failed the toolkit's way (exit 2, one `error:` line naming each needle, no traceback), else
    what was wrong."""
    lines = r.stderr.strip().splitlines()
    if r.returncode != 2 or "Traceback" in r.stderr or len(lines) != 1 or not lines[0].startswith("error: "):
        return f"exit {r.returncode}: {r.stderr.strip()[-300:]!r}"
    missing = [n for n in needles if n not in lines[0]]
    return f"the error does not name {missing}: {lines[0]!r}" if missing else None


class Work:
    """The shared inputs: a small BPE tokenizer, a 300-story training text and a scratch directory."""

    def __init__(self, root: Path):
        from tinystories.data.prepare import train_tokenizer
        from tinystories.data.text import iter_documents

        self.root = root
        self.stories = root / "stories.txt"
        docs = list(iter_documents([TRAIN_HEAD], 300))
        self.stories.write_text("".join(d + "\n<|endoftext|>\n" for d in docs), encoding="utf-8")
        self.tok = root / "tok"
        train_tokenizer(self.stories, 512, self.tok, None)

    def train_args(self, run: Path, steps: int, data_dir: Path | None = None) -> list[str]:
        args = ["train", "--config", REPO / "configs" / "cpu.yaml", "--out", run, "--data", self.stories]
        for s in TINY + [f"train.max_steps={steps}", f"tokenizer.path={self.tok}",
                         f"data.data_dir={data_dir or self.root / 'data'}"]:
            args += ["--set", s]
        return args


# ------------------------------------------------------------------------------------------ kill -9 during train


def checkpoint_problem(run: Path) -> str | None:
    """What is wrong with the run's `latest` checkpoint: a file missing or not matching its recorded SHA-256."""
    from tinystories.data.integrity import sha256_file

    latest = run / "checkpoints" / "latest"
    if not latest.is_symlink():
        return None if not (run / "checkpoints").exists() else "checkpoints/ without a latest link"
    record = latest / "checksums.json"
    if not record.is_file():
        return f"{latest.resolve()}: no checksums.json"
    sums = json.loads(record.read_text())["sha256"]
    bad = [n for n, h in sums.items() if not (latest / n).is_file() or sha256_file(latest / n) != h]
    return f"{latest.resolve()}: torn files {bad}" if bad else None


def same_weights(a: Path, b: Path) -> bool:
    import torch
    from safetensors.torch import load_file

    x, y = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    return x.keys() == y.keys() and all(x[k].dtype == torch.float32 and torch.equal(x[k], y[k]) for k in x)


def chaos_train(w: Work, kills: int, rng: random.Random) -> list[dict]:
    steps = 6 * kills + 12
    ref = w.root / "train-ref"
    r = cli(*w.train_args(ref, steps))
    if r.returncode:
        return [row("kill -9 during train", 0, 0, [f"the uninterrupted run failed: {r.stderr[-300:]}"])]
    run = w.root / "train-killed" / "run"
    args, lost, injected, mid_write = w.train_args(run, steps), [], 0, 0
    for _ in range(kills):
        proc, lines = spawn(*args)
        try:
            lines.saved_step_at_least(1)  # training (and checkpointing) has begun: kill at a random moment after
        except AssertionError as e:
            lost.append(f"a resume failed: {str(e).splitlines()[-1][:200]}")
            break
        time.sleep(rng.uniform(0.0, 0.8))
        if proc.poll() is not None:
            break  # the run finished first: not a kill
        kill9(proc)
        injected += 1
        mid_write += any((run / "checkpoints").glob(".tmp-step-*"))
        problem = checkpoint_problem(run)
        if problem:
            lost.append(f"torn checkpoint after a kill: {problem}")
        args = ["train", "--resume", run]
    r = cli("train", "--resume", run)
    if r.returncode:
        lost.append(f"the final resume failed: {r.stderr.strip()[-300:]}")
    elif not same_weights(ref / "checkpoints" / "latest", run / "checkpoints" / "latest"):
        lost.append("the final weights differ from the uninterrupted run's")
    if list((run / "checkpoints").glob(".tmp-*")):
        lost.append("half-written checkpoints left behind")
    survived = injected if not lost else 0
    return [row(f"kill -9 during train ({mid_write} inside a checkpoint write)", injected, survived, lost)]


# ------------------------------------------------------------------------------------------ kill -9 during prepare


def tree_bytes(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def chaos_prepare(w: Work, kills: int, rng: random.Random) -> list[dict]:
    def args(root: Path):
        return ["data", "prepare", "--tokenizer", w.tok, "--from", DATA, "--cache-dir", root]

    t0 = time.monotonic()
    r = cli(*args(w.root / "cache-ref"))
    took = time.monotonic() - t0
    if r.returncode:
        return [row("kill -9 during data prepare", 0, 0, [f"the uninterrupted build failed: {r.stderr[-300:]}"])]
    killed, lost, injected, mid_write, after_unit = w.root / "cache-killed", [], 0, 0, 0
    for _ in range(3 * kills):
        if injected == kills or lost:
            break
        proc, _lines = spawn(*args(killed))
        t0 = time.monotonic()
        time.sleep(rng.uniform(0.1, 0.95) * took)
        if proc.poll() is not None:  # it finished first: aim earlier, and start the next try from nothing
            took = min(took, time.monotonic() - t0)
            shutil.rmtree(killed)
            continue
        kill9(proc)
        injected += 1
        mid_write += any(".tmp-" in p.name for p in killed.rglob(".*"))
        after_unit += any(killed.rglob("*-00000.json"))
        r = cli(*args(killed))  # the rerun after each kill completes the build
        if r.returncode:
            lost.append(f"the rerun failed: {r.stderr.strip()[-300:]}")
        elif tree_bytes(killed) != tree_bytes(w.root / "cache-ref"):
            lost.append("the finished cache differs from an uninterrupted build (or holds temporary files)")
        shutil.rmtree(killed)  # the next kill starts from an empty cache again
    return [row(f"kill -9 during data prepare ({mid_write} inside a shard write, {after_unit} after a finished unit)",
                injected, injected if not lost else 0, lost)]


# ------------------------------------------------------------------------------------------------- a full disk


class Tmpfs:
    """A small tmpfs mounted on a fresh directory, filled on demand (root only)."""

    def __init__(self, root: Path, size_mb: int):
        self.dir = root / "tmpfs"
        self.dir.mkdir()
        self.filler = self.dir / "filler"
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(self.dir)],
                           capture_output=True, text=True)
        self.ok = r.returncode == 0

    def fill(self, leave: int = 0) -> None:
        """Fill the disk, leaving about `leave` bytes free."""
        free = shutil.disk_usage(self.dir).free
        with open(self.filler, "wb") as f:
            try:
                f.write(b"\0" * max(0, free - leave))
                f.flush()
            except OSError:
                pass

    def free(self) -> None:
        self.filler.unlink(missing_ok=True)

    def close(self) -> None:
        subprocess.run(["umount", str(self.dir)], capture_output=True)


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def full_disk_case(fs: Tmpfs, name: str, first, again, intact, size, fills: list[float]) -> dict:
    """`first()` writes something; `size()` is the size of one such write. Then, for each fraction f in `fills`, the
    disk is filled but for f times that size, so that the next write (`again(i)`, a CLI run writing the next version)
    runs out of space at that point: it must fail in one line naming the path and leave no temporary file, and
    `intact(i)` must hold; after freeing space `again(i)` must succeed and `intact(i + 1)` hold."""
    lost = []
    r = first()
    if r.returncode:
        return row(f"full disk: {name}", 0, 0, [f"the first write failed: {r.stderr.strip()[-300:]}"])
    survived = 0
    for i, fraction in enumerate(fills):
        fs.fill(int(size() * fraction))
        r = again(i)
        log(f"full disk ({fraction:.0%} of the size left), {name}: {r.stderr.strip()}")
        lost_here = [p for p in [one_line_error(r, str(fs.dir), "no space left")] if p]
        temps = [str(p) for p in fs.dir.rglob(".*") if ".tmp" in p.name]
        lost_here += [f"temporary files left: {temps[:3]}"] if temps else []
        lost_here += [f"before freeing space: {p}" for p in [intact(i)] if p]
        fs.free()
        r = again(i)
        if r.returncode:
            lost_here.append(f"the rerun after freeing space failed: {r.stderr.strip()[-300:]}")
        lost_here += [f"after the rerun: {p}" for p in [intact(i + 1)] if p]
        survived += not lost_here
        lost += lost_here
    return row(f"full disk: {name}", len(fills), survived, lost)


def chaos_full_disk(w: Work, quick: bool) -> list[dict]:
    names = ["checkpoint save", "cache build", "export", "tokenizer save"]
    if os.geteuid() != 0:
        return [row(f"full disk: {n}", 0, 0, []) | {"lost": "not run: needs root to mount tmpfs"} for n in names]
    fs = Tmpfs(w.root, 64)
    if not fs.ok:
        return [row(f"full disk: {n}", 0, 0, []) | {"lost": "not run: mount -t tmpfs failed"} for n in names]
    fills = [0.5] if quick else [0.0, 0.25, 0.5, 0.75]  # the free space left, as a share of what the write needs
    try:
        return [case(w, fs, fills) for case in (_disk_checkpoint, _disk_cache, _disk_export, _disk_tokenizer)]
    finally:
        fs.close()


def _loads_checkpoint(run: Path, step: int) -> str | None:
    from tinystories.core.errors import UserError
    from tinystories.model.checkpoint import load_model, load_trainer_state

    try:
        _, ck = load_model(run, prefer="latest")
        load_trainer_state(ck.path)
    except UserError as e:
        return str(e)
    return None if ck.step >= step else f"latest is step {ck.step}, not {step}"


def _disk_checkpoint(w: Work, fs: Tmpfs, fills: list[float]) -> dict:
    run = fs.dir / "run"
    return full_disk_case(
        fs, "checkpoint save", lambda: inproc(*w.train_args(run, 3)),
        lambda i: inproc("train", "--resume", run, "--set", f"train.max_steps={3 * (i + 2)}"),
        lambda i: _loads_checkpoint(run, 3 * (i + 1)), lambda: du(run / "checkpoints" / "latest"), fills)


def _opens(cache_root: Path, n: int) -> str | None:
    from tinystories.core.errors import UserError
    from tinystories.data.cache import TokenCache

    caches = list(cache_root.glob("*/manifest.json"))
    try:
        for m in caches:
            TokenCache.open(m.parent)
    except UserError as e:
        return str(e)
    return None if len(caches) >= n else f"{len(caches)} caches, not {n}"


def _disk_cache(w: Work, fs: Tmpfs, fills: list[float]) -> dict:
    """Each try builds another cache of the real text (another --val-fraction: another fingerprint)."""
    root = fs.dir / "cache"

    def build(source: Path, i: int = 0):
        return inproc("data", "prepare", "--tokenizer", w.tok, "--from", source, "--cache-dir", root,
                      "--val-fraction", f"{0.01 * (i + 1):g}")

    return full_disk_case(fs, "cache build", lambda: build(w.stories), lambda i: build(DATA, i),
                          lambda i: _opens(root, i + 1), lambda: max(du(c) for c in root.iterdir()), fills)


def _export_loads(out: Path) -> str | None:
    from safetensors.torch import load_file

    try:
        json.loads((out / "config.json").read_text())
        load_file(str(out / "model.safetensors"))
    except Exception as e:  # noqa: BLE001 - any failure to load is what this row reports
        return f"{out}: {type(e).__name__}: {e}"
    return None


def _disk_export(w: Work, fs: Tmpfs, fills: list[float]) -> dict:
    out = fs.dir / "hf"
    ck = w.root / "train-ref"
    return full_disk_case(
        fs, "export", lambda: inproc("export", "--format", "hf", "--checkpoint", ck, "--out", out),
        lambda i: inproc("export", "--format", "hf", "--checkpoint", ck, "--out", out, "--force"),
        lambda i: _export_loads(out), lambda: du(out), fills)


def _tokenizer_loads(d: Path) -> str | None:
    from tinystories.core.errors import UserError
    from tinystories.data.tokenizer import load_tokenizer

    try:
        load_tokenizer(d)
    except UserError as e:
        return str(e)
    return None


def _disk_tokenizer(w: Work, fs: Tmpfs, fills: list[float]) -> dict:
    out = fs.dir / "tok"

    def train(*force):
        return inproc("tokenizer", "train", "--vocab-size", "1024", "--from", w.stories, "--out", out, *force)

    return full_disk_case(fs, "tokenizer save", train, lambda i: train("--force"), lambda i: _tokenizer_loads(out),
                          lambda: du(out / "tokenizer.json"), fills)


# ------------------------------------------------------------------------------------------------- corruption


def flip_byte(path: Path, at: float = 0.5) -> None:
    data = bytearray(path.read_bytes())
    data[int(len(data) * at)] ^= 0x01
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2 + 1])


def corruption_case(name: str, target: Path, damage, command: list, *needles: str) -> dict:
    """Damage a copy of `target`, run `command`: it must fail in one line naming the file (and `needles`)."""
    damage(target)
    r = inproc(*command)
    log(f"{name}: {r.stderr.strip()}")
    problem = one_line_error(r, str(target), *needles)
    return row(f"corrupt: {name}", 1, 0 if problem else 1, [problem] if problem else [])


def chaos_corruption(w: Work) -> list[dict]:
    root = w.root / "corrupt"
    ref = w.root / "train-ref"
    rows = []
    for name, rel, damage, cmd in [
        ("flipped byte in model.safetensors", "model.safetensors", flip_byte,
         lambda ck: ["generate", "--checkpoint", ck, "--prompt", "Once", "--max-new-tokens", "3"]),
        ("flipped byte in trainer.pt", "trainer.pt", flip_byte, lambda ck: ["train", "--resume", ck.parent.parent]),
        ("flipped byte in tokenizer.json", "tokenizer.json", lambda p: flip_byte(p, 0.7),
         lambda ck: ["generate", "--checkpoint", ck, "--prompt", "Once", "--max-new-tokens", "3"]),
    ]:
        run = root / rel / "run"
        shutil.copytree(ref, run, symlinks=True)
        ck = (run / "checkpoints" / "latest").resolve()
        rows.append(corruption_case(name, ck / rel, damage, cmd(ck), "checksum mismatch"))
    tok = root / "tok"
    shutil.copytree(w.tok, tok)
    rows.append(corruption_case("flipped byte in a trained tokenizer.json", tok / "tokenizer.json",
                                lambda p: flip_byte(p, 0.7), ["tokenizer", "report", "--tokenizer", tok, "--from",
                                                              w.stories, "--stories", "3"], "checksum mismatch"))
    cache = next((w.root / "cache-ref").glob("*/manifest.json")).parent
    for name, rel, damage in [("flipped byte in a token shard", "train-00000.bin", flip_byte),
                              ("truncated manifest.json", "manifest.json", truncate)]:
        copy = root / rel.replace(".", "_") / cache.name
        shutil.copytree(cache, copy)
        rows.append(corruption_case(name, copy / rel, damage,
                                    ["data", "prepare", "--tokenizer", w.tok, "--from", DATA, "--cache-dir",
                                     copy.parent], "data prepare"))
    rows.append(_torn_metrics(ref, root))
    return rows


def _torn_metrics(ref: Path, root: Path) -> dict:
    """A metrics.jsonl cut mid-line (a kill, a full disk): readers skip the torn line with a one-line note naming the
    file; `train --resume` cuts it off before appending."""
    run = root / "metrics" / "run"
    shutil.copytree(ref, run, symlinks=True)
    f = run / "metrics.jsonl"
    f.write_bytes(f.read_bytes()[:-7])
    r = inproc("plot", run, "--out", root / "metrics" / "plot.png")
    note = [ln for ln in r.stderr.splitlines() if ln.startswith("note: ") and str(f) in ln]
    lost = [] if r.returncode == 0 and len(note) == 1 else [f"plot: exit {r.returncode}: {r.stderr.strip()[-300:]!r}"]
    return row("corrupt: truncated metrics.jsonl (torn last line)", 1, 0 if lost else 1, lost)


# ---------------------------------------------------------------------------------------------------- the table


def server_rows(quick: bool) -> list[dict]:
    try:
        import chaos_serve
    except ImportError:
        return []
    return chaos_serve.run(quick)


def print_table(rows: list[dict]) -> None:
    cols = ["fault", "injected", "survived", "lost"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "|".join(" --- " for _ in cols) + "|")
    for r in rows:
        print("| " + " | ".join(str(r[c]).replace("|", "/") for c in cols) + " |")


def cpu_kind() -> str:
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    name = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")), "?")
    flags = set(next((ln.split(":", 1)[1].split() for ln in info.splitlines() if ln.startswith("flags")), []))
    return (f"{name}, {'avx512_bf16' if 'avx512_bf16' in flags else 'no avx512_bf16'}, "
            f"{'AMX' if 'amx_tile' in flags else 'no AMX'}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a few faults of each kind (about a minute)")
    ap.add_argument("--seed", type=int, default=0, help="the random kill moments")
    ap.add_argument("--only", help="some of the stages: train,prepare,disk,corruption,server (the disk and "
                                   "corruption stages use the train and prepare stages' outputs)")
    args = ap.parse_args()
    if not TRAIN_HEAD.is_file():
        print(f"needs the real text in {DATA} (see ../shared/README.md)", file=sys.stderr)
        return 2
    rng = random.Random(args.seed)
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="chaos-") as tmp:
        w = Work(Path(tmp))
        rows = []
        stages = {"train": lambda: chaos_train(w, 2 if args.quick else 24, rng),
                  "prepare": lambda: chaos_prepare(w, 2 if args.quick else 12, rng),
                  "disk": lambda: chaos_full_disk(w, args.quick), "corruption": lambda: chaos_corruption(w),
                  "server": lambda: server_rows(args.quick)}
        for name, stage in stages.items():
            if args.only and name not in args.only.split(","):
                continue
            t1 = time.time()
            rows += stage()
            log(f"[{name}: {time.time() - t1:.0f} s]")
    print_table(rows)
    load = os.getloadavg()
    print(f"\n{'--quick' if args.quick else 'full'} run in {time.time() - t0:.0f} s on {cpu_kind()} "
          f"({os.cpu_count()} cores visible), load average {load[0]:.1f} at the end")
    return 0 if all(r["lost"] == NOTHING or r["lost"].startswith("not run") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
