"""Load test for `tinystories serve`: N concurrent streaming clients for a fixed time.

    python benchmarks/serve_load.py --checkpoint CK                 # starts a server on a free loopback port
    python benchmarks/serve_load.py --url http://127.0.0.1:8000     # an already running server
    python benchmarks/serve_load.py --checkpoint CK --clients 20 --duration 30 --max-new-tokens 128

Each client loops: POST /v1/generate with stream=true, read the server-sent events to the final `done` event,
repeat. A 429 (the server's --max-concurrent limit) is counted separately and retried after Retry-After;
anything else that goes wrong (a status other than 200/429, a broken stream, no `done` event) is an error.
Prints requests completed, errors, 429s, time to first token (p50/p99) and tokens per second.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["Once upon a time", "Lily wanted to fly a kite, but", "Tom found a shiny red ball in the park.",
           "One day, a tiny bird could not find its mom.", "The sun was hot, so Ben and Sue went to the"]


def percentile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    k = min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))
    return s[k]


class Stats:
    def __init__(self):
        self.completed = 0
        self.errors = 0
        self.busy = 0
        self.ttft: list[float] = []
        self.latency: list[float] = []
        self.tokens = 0
        self.decode_rates: list[float] = []
        self.error_samples: list[str] = []

    def error(self, what: str) -> None:
        self.errors += 1
        if len(self.error_samples) < 5:
            self.error_samples.append(what)


async def one_request(client: httpx.AsyncClient, url: str, body: dict, stats: Stats) -> float:
    """Returns seconds to wait before the next request (Retry-After on 429, else 0)."""
    t0 = time.perf_counter()
    first = None
    n = 0
    done = None
    try:
        async with client.stream("POST", url + "/v1/generate", json=body) as r:
            if r.status_code == 429:
                stats.busy += 1
                await r.aread()
                return float(r.headers.get("Retry-After", "1"))
            if r.status_code != 200:
                stats.error(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
                return 0.0
            event = None
            async for line in r.aiter_lines():
                if line.startswith("event:"):
                    event = line[6:].strip()
                elif line.startswith("data:"):
                    if event == "token":
                        if first is None:
                            first = time.perf_counter()
                        n += 1
                    elif event == "done":
                        done = json.loads(line[5:])
                    elif event == "error":
                        stats.error(f"error event: {line[5:200]}")
                        return 0.0
    except httpx.HTTPError as e:
        stats.error(f"{type(e).__name__}: {e}")
        return 0.0
    end = time.perf_counter()
    if done is None:
        stats.error("stream ended without a done event")
        return 0.0
    stats.completed += 1
    stats.tokens += done["completion_tokens"]
    stats.latency.append(end - t0)
    if first is not None:
        stats.ttft.append(first - t0)
        if n > 1 and end > first:
            stats.decode_rates.append((n - 1) / (end - first))
    return 0.0


async def client_loop(i: int, url: str, args, stats: Stats, deadline: float) -> None:
    limits = httpx.Limits(max_connections=2, max_keepalive_connections=1)
    async with httpx.AsyncClient(timeout=httpx.Timeout(args.request_timeout), limits=limits) as client:
        k = 0
        while time.perf_counter() < deadline:
            body = {"prompt": PROMPTS[(i + k) % len(PROMPTS)], "max_new_tokens": args.max_new_tokens,
                    "temperature": 0.8, "stream": True, "seed": i * 1000 + k}
            k += 1
            wait = await one_request(client, url, body, stats)
            if wait:
                await asyncio.sleep(min(wait, max(0.0, deadline - time.perf_counter())))


async def run_load(url: str, args) -> tuple[Stats, float]:
    stats = Stats()
    t0 = time.perf_counter()
    deadline = t0 + args.duration
    await asyncio.gather(*(client_loop(i, url, args, stats, deadline) for i in range(args.clients)))
    return stats, time.perf_counter() - t0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "tinystories", "serve", "--checkpoint", args.checkpoint, "--port", str(port),
           "--max-concurrent", str(args.max_concurrent or args.clients), "--timeout", str(args.request_timeout),
           "--log-level", "warning"]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if not args.compile:
        cmd.append("--no-compile")
    proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    end = time.monotonic() + 120
    while time.monotonic() < end:
        if proc.poll() is not None:
            sys.exit(f"the server exited with status {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.terminate()
    sys.exit("the server did not start within 120 s")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="start `tinystories serve` on this checkpoint (loopback, free port)")
    src.add_argument("--url", help="use a running server instead")
    ap.add_argument("--clients", type=int, default=20, help="concurrent streaming clients (default: 20)")
    ap.add_argument("--duration", type=float, default=30.0, help="seconds to keep starting requests (default: 30)")
    ap.add_argument("--max-new-tokens", type=int, default=128, help="tokens per request (default: 128)")
    ap.add_argument("--max-concurrent", type=int, default=None,
                    help="the started server's --max-concurrent (default: --clients, so no 429s)")
    ap.add_argument("--threads", type=int, default=None, help="the started server's --threads")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                    help="the started server's --compile / --no-compile (default: compiled decoding, as serve)")
    ap.add_argument("--request-timeout", type=float, default=120.0, help="per-request limit in seconds")
    args = ap.parse_args()

    proc = None
    url = args.url.rstrip("/") if args.url else None
    if args.checkpoint:
        proc, url = start_server(args)
    try:
        info = httpx.get(url + "/v1/model", timeout=10).json()
        health = httpx.get(url + "/health", timeout=10).json()
        print(f"server    {url}  model {info['name']} ({info['parameters']:,} parameters, device {info['device']}), "
              f"max-concurrent {health['max_concurrent']}")
        print(f"load      {args.clients} streaming clients for {args.duration:g} s, "
              f"{args.max_new_tokens} new tokens per request")
        stats, wall = asyncio.run(run_load(url, args))
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(15)
    ms = lambda s: f"{s * 1000:.0f} ms"  # noqa: E731
    print(f"wall      {wall:.1f} s (requests still running at the deadline were finished)")
    print(f"requests  {stats.completed} completed, {stats.errors} errors, {stats.busy} rejected with 429 (retried)")
    print(f"TTFT      p50 {ms(percentile(stats.ttft, 50))}, p99 {ms(percentile(stats.ttft, 99))}")
    print(f"latency   p50 {percentile(stats.latency, 50):.2f} s, p99 {percentile(stats.latency, 99):.2f} s per request")
    print(f"tokens    {stats.tokens:,} generated, {stats.tokens / wall:.1f} tokens/s in all; "
          f"{statistics.median(stats.decode_rates) if stats.decode_rates else float('nan'):.1f} tokens/s per stream "
          f"(median)")
    for e in stats.error_samples:
        print(f"error     {e}")
    return 1 if stats.errors else 0


if __name__ == "__main__":
    sys.exit(main())
