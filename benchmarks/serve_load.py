"""Load test for `tinystories serve`: N simultaneous streaming clients for a fixed time, old vs new server.

    python benchmarks/serve_load.py --checkpoint CK                          # 1, 8, 20, 64 clients; old vs new
    python benchmarks/serve_load.py --checkpoint CK --clients 20 --duration 30 --max-new-tokens 128
    python benchmarks/serve_load.py --checkpoint CK --config "b8=--max-batch 8" --config "b32=--max-batch 32"
    python benchmarks/serve_load.py --checkpoint CK --config "v0=--max-concurrent 4" --code v0=/tmp/old-checkout
    python benchmarks/serve_load.py --url http://127.0.0.1:8000              # an already running server
    python benchmarks/serve_load.py --checkpoint CK --engine-batches 1,8,16,32,64   # the engine alone, no HTTP
    python benchmarks/serve_load.py --checkpoint CK --engine-batches 1,8,20 --dtypes float32,auto --rounds 3
    python benchmarks/serve_load.py --checkpoint CK --engine-batches 1,8,20 \
        --dtypes float32:torch.compile,float32,int8 --rounds 3     # torch.compile's step against ahead of time
    python benchmarks/serve_load.py --checkpoint CK --clients 1,8,20 --config "f32=--dtype float32" \\
        --config "auto=--dtype auto"                                         # the same over HTTP
    python benchmarks/serve_load.py --checkpoint CK --clients 1,8,20 \
        --config "f32-torch.compile=TINYSTORIES_AOT=0 --dtype float32" --config "int8=--dtype int8"
                                      # leading NAME=VALUE words of a config are the server's environment

For each configuration (default: `old` = `--max-batch 1 --max-queue 0`, i.e. one generation at a time and a
429 for everyone else, and `new` = the defaults: continuous batching and a queue) the script starts `tinystories
serve` on a free loopback port (from another source tree with --code LABEL=DIR, e.g. an earlier checkout) and
runs each client count in turn for --duration seconds. Each client loops: POST /v1/generate with stream=true,
read the events to the final `done`, repeat; a 429 is counted and retried after Retry-After; every
--abandon-every'th request of a client is dropped after 3 tokens (a reader who leaves). Anything else that goes
wrong (a 5xx, a broken stream or connection, no `done` event) is an error. Per run it prints requests
completed, 429s, errors, time to first token (p50/p99, from sending the request), aggregate tokens/s, whether
every slot was free afterwards (and how many abandoned requests the server counted as cancelled), the server's
own cancel-to-free time, and for the last client count the server's RSS after 10 s and at the end. Then a
disconnect probe: with 8 clients streaming, a client reads a few tokens, closes its connection and polls
/health until the server counts the cancellation (client close -> slot free, over HTTP); its request asks for
at most the model's context (from /v1/model). Every figure is printed with the machine it was measured on (CPU
model, GPU when the server runs on one) and the server's device and precision. Every loop is bounded: a server
that refuses a request for good (a 4xx) or never frees a slot ends the run with a message, not a hang.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tinystories.core.machine import cpu_name

REPO = Path(__file__).resolve().parents[1]
PROBE_TOKENS = 400  # the disconnect probe's request: long enough to be running when it is dropped (capped by context)
MAX_ATTEMPTS = 50  # tries of one probe request (429s, stories that end in under 3 tokens) before giving up
MAX_CONSECUTIVE_FAILURES = 20  # a load client stops after this many failed requests in a row
PROMPTS = ["Once upon a time", "Lily wanted to fly a kite, but", "Tom found a shiny red ball in the park.",
           "One day, a tiny bird could not find its mom.", "The sun was hot, so Ben and Sue went to the"]


def percentile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))]


class BenchError(Exception):
    """The benchmark cannot go on (a request refused for good, a slot never freed): printed, exit status 1."""


def gpu_name() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    names = [n.strip() for n in out.stdout.splitlines() if n.strip()]
    return ", ".join(names) if out.returncode == 0 and names else None


def machine(device: str | None = None) -> str:
    """Where a figure was measured: this machine's CPU (and GPU when `device` is one), for every printed run."""
    where = f"{cpu_name()}, {os.cpu_count()} CPUs, {platform.system()} {platform.machine()}"
    if device and device.startswith("cuda"):
        where += f"; GPU {gpu_name() or 'unknown'}"
    return where


class Stats:
    def __init__(self):
        self.completed = self.errors = self.busy = self.server_errors = self.abandoned = self.tokens = 0
        self.ttft: list[float] = []
        self.error_samples: list[str] = []

    def error(self, what: str) -> None:
        self.errors += 1
        if len(self.error_samples) < 3:
            self.error_samples.append(what)


async def one_request(client: httpx.AsyncClient, url: str, body: dict, stats: Stats, abandon: bool) -> float:
    """One streaming request. Returns seconds to wait before the next one (Retry-After on 429, else 0)."""
    t0 = time.perf_counter()
    first, n, done = None, 0, None
    try:
        async with client.stream("POST", url + "/v1/generate", json=body) as r:
            if r.status_code == 429:
                stats.busy += 1
                await r.aread()
                return float(r.headers.get("Retry-After", "1"))
            if r.status_code != 200:
                stats.server_errors += r.status_code >= 500
                stats.error(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
                return 0.0
            event = None
            async for line in r.aiter_lines():
                if line.startswith("event:"):
                    event = line[6:].strip()
                elif line.startswith("data:"):
                    if event == "token":
                        first = first or time.perf_counter()
                        n += 1
                        if abandon and n >= 3:
                            stats.abandoned += 1
                            stats.ttft.append(first - t0)
                            return 0.0  # leaving the block closes the connection mid-stream
                    elif event == "done":
                        done = json.loads(line[5:])
                    elif event == "error":
                        stats.error(f"error event: {line[5:200]}")
                        return 0.0
    except httpx.HTTPError as e:
        stats.error(f"{type(e).__name__}: {e}")
        return 0.0
    if done is None:
        stats.error("stream ended without a done event")
        return 0.0
    stats.completed += 1
    stats.tokens += done["completion_tokens"]
    if first is not None:
        stats.ttft.append(first - t0)
    return 0.0


async def client_loop(i: int, url: str, args, stats: Stats, deadline: float) -> None:
    """Requests one after another until `deadline`; gives up (an error) after MAX_CONSECUTIVE_FAILURES in a row."""
    limits = httpx.Limits(max_connections=2, max_keepalive_connections=1)
    async with httpx.AsyncClient(timeout=httpx.Timeout(args.request_timeout), limits=limits) as client:
        k = failures = 0
        while time.perf_counter() < deadline:
            body = {"prompt": PROMPTS[(i + k) % len(PROMPTS)], "max_new_tokens": args.max_new_tokens,
                    "temperature": 0.8, "stream": True, "seed": i * 1000 + k}
            k += 1
            abandon = bool(args.abandon_every) and k % args.abandon_every == 0
            errors = stats.errors
            wait = await one_request(client, url, body, stats, abandon)
            failures = failures + 1 if stats.errors > errors else 0
            if failures >= MAX_CONSECUTIVE_FAILURES:
                stats.error(f"client {i} gave up after {failures} failed requests in a row")
                return
            if wait:
                await asyncio.sleep(min(wait, max(0.0, deadline - time.perf_counter())))


def rss_mb(pid: int | None) -> float | None:
    if pid is None:
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


async def run_load(url: str, clients: int, args, pid: int | None) -> tuple[Stats, float, list]:
    stats = Stats()
    t0 = time.perf_counter()
    deadline = t0 + args.duration
    rss: list = [None, None]

    async def sample_rss():
        await asyncio.sleep(min(10.0, args.duration / 2))
        rss[0] = rss_mb(pid)

    probe = asyncio.create_task(sample_rss())
    await asyncio.gather(*(client_loop(i, url, args, stats, deadline) for i in range(clients)))
    rss[1] = rss_mb(pid)
    probe.cancel()
    return stats, time.perf_counter() - t0, rss


def health(url: str) -> dict:
    return httpx.get(url + "/health", timeout=30).json()


def wait_free(url: str, timeout: float = 60.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        h = health(url)
        if h["active"] == 0 and h.get("queued", 0) == 0:
            return True
        time.sleep(0.05)
    return False


async def disconnect_probe(url: str, args, context: int | None, repeats: int = 5) -> list[float]:
    """With 8 clients streaming, close a stream after 3 tokens and poll /health until the server counted the
    cancellation. Returns the times (s) from closing to the slot being free. `context`: the model's (the probe's
    request asks for at most that many tokens; None: --max-new-tokens, which the load used)."""
    out: list[float] = []
    stop = time.perf_counter() + 3600  # a bound only: the background clients are cancelled when the probe ends
    bg_args = argparse.Namespace(**{**vars(args), "abandon_every": 0})
    max_new = min(PROBE_TOKENS, context) if context else args.max_new_tokens
    background = [asyncio.create_task(client_loop(100 + i, url, bg_args, Stats(), stop)) for i in range(8)]
    try:
        async with httpx.AsyncClient(timeout=30) as client:
            await asyncio.sleep(1.0)
            h = (await client.get(url + "/health")).json()
            if "cancelled" not in h or not h.get("max_queue"):
                # a server that does not count cancellations, or has no queue: there a client that just finished
                # sends its next request at once and takes the free row again, so the probe would starve
                return out
            for k in range(repeats):
                before = (await client.get(url + "/health")).json()["cancelled"]
                await _probe_stream(url, {"prompt": "Once upon a time", "max_new_tokens": max_new, "stream": True,
                                          "seed": k})
                t_close = time.perf_counter()
                while (await client.get(url + "/health")).json()["cancelled"] <= before:
                    if time.perf_counter() - t_close > 30:
                        raise BenchError("disconnect probe: the server did not count the closed stream as cancelled "
                                         "within 30 s (its slot was never freed)")
                    await asyncio.sleep(0.005)
                out.append(time.perf_counter() - t_close)
    finally:
        for t in background:
            t.cancel()
        await asyncio.gather(*background, return_exceptions=True)
    return out


async def _probe_stream(url: str, body: dict) -> None:
    """Open a stream, read 3 tokens, close it. Retried (at most MAX_ATTEMPTS times) while the server answers 429 or
    the story ends in under 3 tokens; any other answer, or running out of attempts, is a BenchError."""
    for attempt in range(MAX_ATTEMPTS):
        n, request = 0, {**body, "seed": body["seed"] + 1000 * attempt}  # another story each attempt
        async with httpx.AsyncClient(timeout=30) as own:  # its own connection, closed on leaving
            async with own.stream("POST", url + "/v1/generate", json=request) as r:
                if r.status_code == 429:  # busy: a server whose queue is full
                    await r.aread()
                    await asyncio.sleep(float(r.headers.get("Retry-After", "1")))
                    continue
                if r.status_code != 200:
                    raise BenchError(f"disconnect probe: POST /v1/generate {json.dumps(body)} answered HTTP "
                                     f"{r.status_code}: {(await r.aread())[:300].decode(errors='replace')}")
                async for line in r.aiter_lines():
                    n += line.startswith("event: token")
                    if n >= 3:
                        return  # leaving the blocks closes the connection mid-stream
    raise BenchError(f"disconnect probe: no stream reached 3 tokens in {MAX_ATTEMPTS} attempts (429s, or stories "
                     "that ended at once)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, flags: list[str], code: Path, checkpoint: str) -> tuple[subprocess.Popen, str]:
    """Start `tinystories serve` with `flags`; leading NAME=VALUE words are its environment (TINYSTORIES_AOT=0)."""
    extra = {}
    while flags and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", flags[0]):
        name, value = flags.pop(0).split("=", 1)
        extra[name] = value
    port = free_port()
    cmd = [sys.executable, "-m", "tinystories", "serve", "--checkpoint", str(Path(checkpoint).resolve()),
           "--port", str(port), "--timeout", str(args.request_timeout), "--log-level", "warning", *flags]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if not args.compile:
        cmd.append("--no-compile")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(code), **extra}
    proc = subprocess.Popen(cmd, cwd=code, env=env)
    url = f"http://127.0.0.1:{port}"
    end = time.monotonic() + 300
    while time.monotonic() < end:
        if proc.poll() is not None:
            sys.exit(f"the server exited with status {proc.returncode}: {shlex.join(cmd)}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.terminate()
    sys.exit("the server did not start within 300 s")


def model_info(url: str) -> dict:
    """GET /v1/model (an older server may lack some fields: context, dtype)."""
    r = httpx.get(url + "/v1/model", timeout=30)
    r.raise_for_status()
    return r.json()


def describe_server(info: dict, url: str) -> str:
    """Where the figures of this server come from: the machine, the server's device and precision."""
    local = httpx.URL(url).host in ("127.0.0.1", "localhost", "::1")
    where = machine(info.get("device")) if local else f"a remote server (this client: {machine()})"
    return f"{where}; server device {info.get('device', 'not reported')}, precision {info.get('dtype', 'not reported')}"


def check_fits(args, info: dict) -> None:
    ctx = info.get("context")
    if ctx and args.max_new_tokens > ctx:
        raise BenchError(f"--max-new-tokens {args.max_new_tokens} exceeds the model's context of {ctx} tokens "
                         f"(the server would answer every request with 422): give at most {ctx}")


def bench(label: str, url: str, args, pid: int | None, info: dict) -> list[dict]:
    rows = []
    where = describe_server(info, url)
    print(f"{label:>8}  measured on: {where}")
    print(HEADER)
    for clients in args.clients:
        before = health(url)
        stats, wall, rss = asyncio.run(run_load(url, clients, args, pid))
        freed = wait_free(url)
        after = health(url)
        cancelled = after.get("cancelled", 0) - before.get("cancelled", 0)
        c2f = after.get("cancel_to_free_ms")
        row = {"config": label, "clients": clients, "completed": stats.completed, "429": stats.busy,
               "errors": stats.errors, "5xx": stats.server_errors, "ttft_p50_ms": 1000 * percentile(stats.ttft, 50),
               "ttft_p99_ms": 1000 * percentile(stats.ttft, 99), "tokens_per_s": stats.tokens / wall,
               "abandoned": stats.abandoned, "cancelled": cancelled, "slots_free": freed,
               "cancel_to_free_max_ms": c2f["max"] if c2f else None, "rss_mb": rss, "measured_on": where}
        rows.append(row)
        print_row(row)
        for e in stats.error_samples:
            print(f"    error: {e}")
    probe = asyncio.run(disconnect_probe(url, args, info.get("context")))
    if probe:
        print(f"{label:>8}  disconnect probe (8 streaming clients): client close -> slot free over HTTP "
              f"{', '.join(f'{1000 * t:.0f}' for t in probe)} ms (max {1000 * max(probe):.0f} ms)")
    return rows


HEADER = (f"{'config':>8} {'clients':>7} {'done':>6} {'429s':>6} {'errors':>6} {'5xx':>4} {'TTFT p50':>9} "
          f"{'TTFT p99':>9} {'tokens/s':>9}  {'left':>4} {'cancelled':>9} {'freed':>5}  RSS MB (10 s -> end)")


def print_row(r: dict) -> None:
    rss = r["rss_mb"]
    rss_s = f"{rss[0]:.0f} -> {rss[1]:.0f}" if rss and rss[0] and rss[1] else "-"
    print(f"{r['config']:>8} {r['clients']:>7} {r['completed']:>6} {r['429']:>6} {r['errors']:>6} {r['5xx']:>4} "
          f"{r['ttft_p50_ms']:>6.0f} ms {r['ttft_p99_ms']:>6.0f} ms {r['tokens_per_s']:>9.1f}  {r['abandoned']:>4} "
          f"{r['cancelled']:>9} {'yes' if r['slots_free'] else 'NO':>5}  {rss_s}", flush=True)


def engine_only(args) -> int:
    """The engine without HTTP: for each --max-batch in --engine-batches, 2 x batch requests (at least 16) of
    --max-new-tokens each, submitted at once; prints aggregate tokens/s (how --max-batch's default was chosen). With
    several --dtypes (model/precision.py), each batch size runs every precision in interleaved rounds, best of
    --rounds (a busy machine slows both sides alike)."""
    import torch

    sys.path.insert(0, str(REPO))
    from tinystories.inference.frontend import Engine
    from tinystories.inference.sampling import SamplingParams, prompt_ids
    from tinystories.model.checkpoint import load_model
    from tinystories.model.exported_step import compile_for_decoding
    from tinystories.model.precision import inference_precision

    torch.set_num_threads(args.threads or 1)
    models = {}
    for entry in args.dtypes.split(","):  # "float32", or "float32:torch.compile" for torch.compile's step
        dtype, _, how = entry.partition(":")
        model, ck = load_model(args.checkpoint, "cpu")
        precision = inference_precision(model, torch.device("cpu"), dtype)
        if args.compile and how == "torch.compile":
            model.compile_decoding()
        elif args.compile:
            how = compile_for_decoding(model)
        models[precision.name + (f" ({how})" if args.compile else "")] = model
        print(precision.describe(), flush=True)
    if args.max_new_tokens > model.cfg.max_seq_len:
        raise BenchError(f"--max-new-tokens {args.max_new_tokens} exceeds the model's context of "
                         f"{model.cfg.max_seq_len} tokens")

    async def run(model, batch: int) -> tuple[int, float, float]:
        engine = Engine(model, ck.tokenizer, max_batch=batch, max_queue=10_000)
        t0 = time.perf_counter()
        engine.warm_up()
        warm = time.perf_counter() - t0
        jobs = [engine.submit(prompt_ids(ck.tokenizer, PROMPTS[i % len(PROMPTS)]),
                              SamplingParams(max_new_tokens=args.max_new_tokens, temperature=0.8, seed=i))
                for i in range(max(16, 2 * batch))]
        t0 = time.perf_counter()
        for job in jobs:
            await job.result()
        engine.close()
        return sum(len(j.token_ids) for j in jobs), time.perf_counter() - t0, warm

    print(f"engine only (no HTTP): {ck.path}, {'compiled' if args.compile else 'eager'}, "
          f"{args.max_new_tokens} new tokens per request, {torch.get_num_threads()} torch thread(s)\n"
          f"measured on: {machine('cpu')}; device cpu, load {os.getloadavg()[0]:.1f}")
    for batch in [int(b) for b in args.engine_batches.split(",")]:
        best: dict[str, float] = {}
        for _ in range(args.rounds):
            for name, model in models.items():
                tokens, secs, warm = asyncio.run(run(model, batch))
                best[name] = max(best.get(name, 0.0), tokens / secs)
        first = next(iter(best))
        print(f"  --max-batch {batch:>3}: " + ", ".join(
            f"{name} {tps:7.0f} tokens/s" + (f" ({tps / best[first]:.2f}x {first})" if name != first else "")
            for name, tps in best.items()) + f"  (load {os.getloadavg()[0]:.1f})", flush=True)
    return 0


def main() -> int:
    try:
        return _main()
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def _main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="start `tinystories serve` on this checkpoint (loopback, free port)")
    src.add_argument("--url", help="use a running server instead")
    ap.add_argument("--clients", default="1,8,20,64", help="simultaneous clients, one run each (default: 1,8,20,64)")
    ap.add_argument("--duration", type=float, default=20.0, help="seconds per run (default: 20)")
    ap.add_argument("--max-new-tokens", type=int, default=128, help="tokens per request (default: 128)")
    ap.add_argument("--config", action="append", default=None, metavar="LABEL=FLAGS",
                    help="a server to compare, e.g. 'old=--max-batch 1 --max-queue 0' (repeatable; default: that "
                         "and 'new=' with the defaults)")
    ap.add_argument("--code", action="append", default=[], metavar="LABEL=DIR",
                    help="run configuration LABEL from the source tree DIR (e.g. an earlier checkout)")
    ap.add_argument("--checkpoint-of", action="append", default=[], metavar="LABEL=CK",
                    help="configuration LABEL serves this checkpoint instead (e.g. a copy an older tree can read)")
    ap.add_argument("--abandon-every", type=int, default=5,
                    help="every Nth request of a client leaves after 3 tokens (default: 5; 0: never)")
    ap.add_argument("--threads", type=int, default=None, help="the started servers' --threads")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                    help="the started servers' --compile / --no-compile (default: compiled decoding, as serve)")
    ap.add_argument("--request-timeout", type=float, default=120.0, help="per-request limit in seconds")
    ap.add_argument("--engine-batches", default=None, metavar="B1,B2,...",
                    help="instead of HTTP load: the engine in-process at these --max-batch values (needs --checkpoint)")
    ap.add_argument("--dtypes", default="float32", metavar="D1,D2",
                    help="with --engine-batches: the precisions to compare (float32,bfloat16,int8,auto; default "
                         "float32; D:torch.compile compiles that one with torch.compile instead of ahead of time); "
                         "the servers of --config take `--dtype D` among their flags")
    ap.add_argument("--rounds", type=int, default=1, help="with --engine-batches: best of this many rounds")
    args = ap.parse_args()
    if args.engine_batches:
        if not args.checkpoint:
            ap.error("--engine-batches needs --checkpoint")
        return engine_only(args)
    args.clients = [int(c) for c in str(args.clients).split(",")]
    configs = [c.split("=", 1) for c in (args.config or ["old=--max-batch 1 --max-queue 0", "new="])]
    codes = {label: Path(d).resolve() for label, d in (c.split("=", 1) for c in args.code)}
    checkpoints = dict(c.split("=", 1) for c in args.checkpoint_of)

    print(f"load: {','.join(map(str, args.clients))} streaming clients, {args.duration:g} s each, "
          f"{args.max_new_tokens} new tokens per request, every {args.abandon_every or 'no'}th request abandoned; "
          f"{os.cpu_count()} CPUs")
    rows = []
    if args.url:
        url = args.url.rstrip("/")
        info = model_info(url)
        check_fits(args, info)
        return report(bench("url", url, args, None, info))
    for label, flags in configs:
        code, checkpoint = codes.get(label, REPO), checkpoints.get(label, args.checkpoint)
        proc, url = start_server(args, shlex.split(flags), code, checkpoint)
        try:
            info = model_info(url)
            check_fits(args, info)
            print(f"\n{label}: tinystories serve {flags or '(defaults)'}  [{code}]  model "
                  f"{info['name']} ({info['parameters']:,} parameters, context {info.get('context', '?')}, device "
                  f"{info['device']}, precision {info.get('dtype', 'not reported')}), limits "
                  f"{json.dumps(info.get('limits'))}")
            rows += bench(label, url, args, proc.pid, info)
        finally:
            proc.terminate()
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
    return report(rows)


def report(rows: list[dict]) -> int:
    by = {(r["config"], r["clients"]): r for r in rows}
    labels = list(dict.fromkeys(r["config"] for r in rows))
    if len(labels) >= 2:
        base, new = labels[0], labels[-1]
        print(f"\n{new} vs {base}: aggregate tokens/s")
        for c in dict.fromkeys(r["clients"] for r in rows):
            if (base, c) in by and (new, c) in by and by[(base, c)]["tokens_per_s"] > 0:
                print(f"  {c:>3} clients: {by[(new, c)]['tokens_per_s']:.1f} / {by[(base, c)]['tokens_per_s']:.1f} = "
                      f"{by[(new, c)]['tokens_per_s'] / by[(base, c)]['tokens_per_s']:.2f}x")
    if rows:
        print("figures measured on:")
        for where in dict.fromkeys(f"{r['config']}: {r['measured_on']}" for r in rows):
            print(f"  {where}")
    bad = [r for r in rows if r["errors"] or not r["slots_free"]]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
