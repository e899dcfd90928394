"""Fault injection against `tinystories serve`: the server rows of the chaos table (benchmarks/chaos.py).

    python benchmarks/chaos_serve.py            # 64 clients for 60 s, 50 fuzzing examples per operation and mode
    python benchmarks/chaos_serve.py --quick    # 8 clients for 10 s, 10 examples (what the test suite runs)

One real server (stories260K imported from ../shared, `--api-key`, eager decoding) takes three kinds of abuse:

* schema fuzzing: schemathesis sends valid and invalid requests for every operation of the server's own
  /openapi.json (tests/test_serve_fuzz.py's `fuzz`); lost = any 5xx or any answer the schema does not declare.
* clients that misbehave: N clients loop for the duration, each request chosen at random: a stream read to its
  end, a stream dropped after a random number of events, a request dropped before its answer, a JSON request,
  or a slow reader (a 4 KiB receive buffer read 256 bytes at a time, every 50 ms). Lost = a 5xx, a connection
  the server broke, a slot still busy once every client has gone (/health: active, queued), a server error
  counted by the engine, or RSS at the end more than 10% above RSS after the first 10 s (quick: 3 s).
* hostile requests: a body over the limit, a prompt longer than the context, NaN / negative / huge sampling
  values, invalid UTF-8, lone surrogates, a missing or wrong key: each must get a 4xx with a message.

`run(quick)` returns the rows (fault, injected, survived, lost: strings); the script prints them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "benchmarks"), str(REPO / "tests")]
from serve_load import free_port, machine, rss_mb  # noqa: E402

SHARED_MODEL = REPO.parent / "shared" / "models" / "llama2c-stories260K"
KEY = "chaos-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
HANG_S = 120  # a hang guard on each call, never a measure of speed
PROMPTS = ["Once upon a time", "Lily wanted to fly a kite, but", "Tom found a shiny red ball in the park.", ""]
KINDS = ("stream", "drop_stream", "drop_early", "json", "slow_reader")


# ------------------------------------------------------------------------------------------------ the server


def start_server(workdir: Path) -> tuple[subprocess.Popen, str, list[str]]:
    """stories260K imported into `workdir`, served with a key on a free loopback port: (process, url, log lines)."""
    ck = workdir / "s260"
    subprocess.run([sys.executable, "-m", "tinystories", "import", "llama2c", str(SHARED_MODEL / "stories260K.bin"),
                    "--tokenizer", str(SHARED_MODEL / "tok512.model"), "--out", str(ck)],
                   cwd=REPO, check=True, capture_output=True, text=True)
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "tinystories", "serve", "--checkpoint", str(ck), "--port", str(port), "--no-compile",
         "--api-key", KEY, "--timeout", "30", "--log-level", "warning"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})
    log: list[str] = []
    for line in proc.stdout:  # until it listens
        log.append(line)
        if line.startswith("serving "):
            break
    if proc.poll() is not None:
        raise SystemExit("the server did not start:\n" + "".join(log))
    threading.Thread(target=lambda: log.extend(proc.stdout), daemon=True).start()  # keep the pipe drained
    return proc, f"http://127.0.0.1:{port}", log


def health(url: str) -> dict:
    return httpx.get(url + "/health", timeout=HANG_S).json()


def wait_free(url: str, timeout: float = 60.0) -> dict:
    """/health once no request is running or queued (or after `timeout` seconds: a slot never freed)."""
    end = time.monotonic() + timeout
    h = health(url)
    while (h["active"] or h["queued"]) and time.monotonic() < end:
        time.sleep(0.05)
        h = health(url)
    return h


# ------------------------------------------------------------------------------------------------ misbehaving clients


class Tally:
    def __init__(self):
        self.kinds = dict.fromkeys(KINDS, 0)
        self.status: dict[int, int] = {}
        self.broken: list[str] = []  # what went wrong that the client did not cause

    def saw(self, status: int) -> None:
        self.status[status] = self.status.get(status, 0) + 1
        if status >= 500 or status not in (200, 429):
            self.broken.append(f"HTTP {status}")


def body(rng: random.Random, stream: bool) -> dict:
    return {"prompt": rng.choice(PROMPTS), "max_new_tokens": rng.randint(8, 400), "stream": stream,
            "temperature": rng.choice([0.0, 0.8, 1.2]), "top_alternatives": rng.choice([0, 0, 5]),
            "seed": rng.randrange(2**31)}


async def stream_request(client: httpx.AsyncClient, url: str, req: dict, drop_after: int | None, tally: Tally):
    """A streamed request, read to its `done` event, or dropped (the connection closed) after `drop_after` events."""
    async with client.stream("POST", url + "/v1/generate", json=req, headers=AUTH) as r:
        tally.saw(r.status_code)
        if r.status_code != 200:
            await r.aread()
            return r.status_code
        events, done = 0, False
        async for line in r.aiter_lines():
            if line.startswith("event:"):
                events += 1
                done = line.strip() in ("event: done", "event: error")
                if drop_after is not None and events >= drop_after:
                    return 200  # leaving the block closes the connection mid-stream
        if not done:
            tally.broken.append("a stream ended without its done event")
        return 200


async def slow_reader(url: str, req: dict, deadline: float, tally: Tally) -> None:
    """A client with a 4 KiB receive buffer that reads 256 bytes every 50 ms, until `done` or the deadline."""
    loop = asyncio.get_running_loop()
    host, port = url.removeprefix("http://").split(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    try:
        await loop.sock_connect(sock, (host, int(port)))
        data = json.dumps(req).encode()
        await loop.sock_sendall(sock, (f"POST /v1/generate HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json"
                                       f"\r\nAuthorization: Bearer {KEY}\r\nContent-Length: {len(data)}\r\n\r\n"
                                       ).encode() + data)
        got, status = b"", None
        while time.perf_counter() < deadline:
            chunk = await asyncio.wait_for(loop.sock_recv(sock, 256), HANG_S)
            if not chunk:
                break
            got = (got + chunk)[-8192:] if status else got + chunk
            if status is None and b"\r\n" in got:
                if not got.startswith(b"HTTP/1.1 ") or not got[9:12].isdigit():
                    tally.broken.append(f"slow reader: not an HTTP answer: {got[:40]!r}")
                    return
                status = int(got[9:12])
                tally.saw(status)
                if status != 200:
                    return
            if b"event: done" in got:
                return
            await asyncio.sleep(0.05)  # the deadline: the reader leaves mid-stream
    finally:
        sock.close()


async def client_loop(i: int, url: str, deadline: float, tally: Tally) -> None:
    rng = random.Random(i)
    async with httpx.AsyncClient(timeout=HANG_S) as client:
        while time.perf_counter() < deadline:
            kind = rng.choice(KINDS)
            tally.kinds[kind] += 1
            try:
                status = await one(kind, rng, client, url, deadline, tally)
            except httpx.HTTPError as e:
                tally.broken.append(f"{kind}: {type(e).__name__}: {e}")
                status = None
            if status == 429:
                await asyncio.sleep(1.0)  # Retry-After


async def one(kind: str, rng: random.Random, client, url: str, deadline: float, tally: Tally) -> int | None:
    if kind == "stream":
        return await stream_request(client, url, body(rng, True), None, tally)
    if kind == "drop_stream":
        return await stream_request(client, url, body(rng, True), rng.randint(1, 30), tally)
    if kind == "slow_reader":
        await slow_reader(url, body(rng, True), min(deadline, time.perf_counter() + rng.uniform(1, 8)), tally)
        return None
    if kind == "drop_early":  # gone before the answer: the request is cancelled while queued or running
        try:
            r = await asyncio.wait_for(client.post(url + "/v1/generate", json=body(rng, False), headers=AUTH),
                                       rng.uniform(0.001, 0.3))
        except asyncio.TimeoutError:
            return None
        tally.saw(r.status_code)  # answered before the client left
        return r.status_code
    r = await client.post(url + "/v1/generate", json=body(rng, False), headers=AUTH)
    tally.saw(r.status_code)
    if r.status_code == 200 and r.json()["finish_reason"] not in ("stop", "length", "timeout"):
        tally.broken.append(f"finish_reason {r.json()['finish_reason']}")
    return r.status_code


async def load(url: str, pid: int, clients: int, duration: float) -> tuple[Tally, float | None, float | None]:
    """`clients` misbehaving clients for `duration` seconds: the tally, RSS (MB) after the warm-up and at the end."""
    tally = Tally()
    warm_up = min(10.0, duration / 3)
    deadline = time.perf_counter() + duration
    loops = asyncio.gather(*(client_loop(i, url, deadline, tally) for i in range(clients)))
    await asyncio.sleep(warm_up)
    rss_warm = rss_mb(pid)
    await loops
    return tally, rss_warm, rss_mb(pid)


# ------------------------------------------------------------------------------------------------ hostile requests


def hostile_cases() -> list[tuple[str, str, bytes, dict]]:
    """(what, path, raw body, extra headers) of requests that must each get a 4xx with a message."""
    j = {"content-type": "application/json"}
    return [
        ("a 2 MB body", "/v1/generate", json.dumps({"prompt": "a" * 2_000_000}).encode(), j),
        ("a prompt longer than the context", "/v1/generate", json.dumps({"prompt": "once upon a time " * 400}).encode(),
         j),
        ("temperature NaN", "/v1/generate", b'{"prompt": "x", "temperature": NaN}', j),
        ("top_p Infinity", "/v1/completions", b'{"prompt": "x", "top_p": Infinity}', j),
        ("temperature -1", "/v1/generate", b'{"prompt": "x", "temperature": -1}', j),
        ("temperature 1e308", "/v1/completions", b'{"prompt": "x", "temperature": 1e308}', j),
        ("max_new_tokens 10**30", "/v1/generate", b'{"prompt": "x", "max_new_tokens": 1' + b"0" * 30 + b"}", j),
        ("max_tokens -5", "/v1/completions", b'{"prompt": "x", "max_tokens": -5}', j),
        ("invalid UTF-8", "/v1/generate", b'{"prompt": "\xff\xfe story"}', j),
        ("a lone surrogate", "/v1/completions", b'{"prompt": "\\ud800"}', j),
        ("a 10,000-character stop string", "/v1/generate", json.dumps({"stop": ["a" * 10_000]}).encode(), j),
        ("not JSON", "/v1/generate", b"{prompt: x", j),
        ("no API key", "/v1/generate", b'{"prompt": "x"}', {"content-type": "application/json", "authorization": ""}),
        ("a wrong API key", "/v1/completions", b'{"prompt": "x"}', {**j, "authorization": "Bearer nope"}),
    ]


def hostile(url: str) -> tuple[int, list[str]]:
    """(requests sent, what did not get a 4xx with a message)."""
    bad = []
    cases = hostile_cases()
    with httpx.Client(timeout=HANG_S, headers=AUTH) as client:
        for what, path, raw, headers in cases:
            r = client.post(url + path, content=raw, headers=headers)
            try:
                said = r.json()
                message = said.get("detail") or said.get("error", {}).get("message")
            except ValueError:
                message = None
            if not 400 <= r.status_code < 500 or not message:
                bad.append(f"{what}: HTTP {r.status_code} {r.text[:200]}")
    return len(cases), bad


# ------------------------------------------------------------------------------------------------ the rows


def run(quick: bool) -> list[dict]:
    """The server rows of the chaos table: fault, injected, survived, lost (strings)."""
    clients, duration, examples = (8, 10.0, 10) if quick else (64, 60.0, 50)
    with tempfile.TemporaryDirectory(prefix="chaos-serve-") as tmp:
        proc, url, log = start_server(Path(tmp))
        try:
            rows = [fuzz_row(url, examples), load_row(url, proc.pid, clients, duration), hostile_row(url)]
            h = health(url)
            if h["errors"] or any("Traceback" in line for line in log):
                rows[-1]["lost"] += f"; engine errors {h['errors']}, server log: {''.join(log)[-300:]!r}"
            return rows
        finally:
            proc.terminate()
            proc.wait(60)


def fuzz_row(url: str, examples: int) -> dict:
    from test_serve_fuzz import fuzz

    out = fuzz(url, KEY, examples)
    n5 = sum(n for s, n in out["statuses"].items() if s >= 500)
    statuses = ", ".join(f"{n} x {s}" for s, n in sorted(out["statuses"].items()))
    return {"fault": f"server: schema fuzzing (schemathesis, every operation, valid and invalid, {examples} "
                     "examples each)",
            "injected": f"{out['requests']} requests", "survived": f"{out['requests'] - n5} ({statuses})",
            "lost": "nothing" if not out["failures"] and not n5
            else f"{n5} 5xx, {len(out['failures'])} answers unlike the schema: {out['failures'][0][:300]}"}


def load_row(url: str, pid: int, clients: int, duration: float) -> dict:
    tally, rss_warm, _ = asyncio.run(load(url, pid, clients, duration))
    h = wait_free(url)
    rss_end = rss_mb(pid)
    n = sum(tally.kinds.values())
    growth = (rss_end - rss_warm) / rss_warm if rss_warm and rss_end else float("nan")
    lost = list(dict.fromkeys(tally.broken))[:3]
    if h["active"] or h["queued"]:
        lost.append(f"slots still busy: {h['active']} running, {h['queued']} queued")
    if not growth <= 0.10:
        lost.append(f"RSS grew {growth:+.1%}")
    kinds = ", ".join(f"{v} {k}" for k, v in tally.kinds.items())
    n5 = sum(v for s, v in tally.status.items() if s >= 500)
    busy = h["active"] + h["queued"]
    return {"fault": f"server: {clients} clients for {duration:g} s that disconnect at random, and slow readers",
            "injected": f"{n} requests ({kinds})",
            "survived": f"{n - len(tally.broken)}: {n5} 5xx, {busy} slots busy at the end ({h['cancelled']} "
                        f"cancelled), RSS {rss_warm:.0f} -> {rss_end:.0f} MB ({growth:+.1%})",
            "lost": "nothing" if not lost else "; ".join(lost)}


def hostile_row(url: str) -> dict:
    n, bad = hostile(url)
    return {"fault": "server: hostile requests (2 MB body, prompt > context, NaN/negative/huge values, invalid "
                     "UTF-8, lone surrogate, long stop string, not JSON, no/wrong key)",
            "injected": str(n), "survived": f"{n - len(bad)} (each a 4xx with a message)",
            "lost": "nothing" if not bad else "; ".join(bad)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="8 clients for 10 s, 10 fuzzing examples")
    args = ap.parse_args()
    t0 = time.perf_counter()
    rows = run(args.quick)
    print(f"# {machine()}; {time.perf_counter() - t0:.0f} s")
    print("| fault | injected | survived | lost |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['fault']} | {r['injected']} | {r['survived']} | {r['lost']} |")
    return 0 if all(r["lost"] == "nothing" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
