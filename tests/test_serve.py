"""`tinystories serve` against a real uvicorn server (the CLI in a subprocess on a free loopback port)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from conftest import REPO, run_cli  # noqa: E402

CONTEXT = 512
HANG_S = 300  # a hang guard on each HTTP call (seconds without a byte), never a measure of speed


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m tinystories serve ...` in a subprocess; stopped by its pid. A thread reads its output (so a full
    pipe never blocks it) and notes the "serving ... on http://" line, which the server prints once it listens."""

    def __init__(self, checkpoint: Path, *args: str, env: dict | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tinystories", "serve", "--checkpoint", str(checkpoint), "--port", str(self.port),
             "--log-level", "warning", *args],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )
        self.lines: list[str] = []
        self.listening = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)
            if line.startswith("serving ") and f":{self.port}/" in line:
                self.listening.set()
        self.listening.set()  # the process ended: wait() looks at why

    def output(self) -> str:
        """Everything the server printed (all of it once the process has exited)."""
        if self.proc.poll() is not None:
            self._reader.join(30)
        return "".join(self.lines)

    def wait(self, timeout: float = 600) -> "Server":
        """Until the server listens (a hang guard of `timeout` s: loading and compiling take what they take)."""
        if not self.listening.wait(timeout) or self.proc.poll() is not None:
            self.proc.kill()
            raise RuntimeError(f"server did not start: {self.output()}")
        assert httpx.get(self.url + "/health", timeout=HANG_S).status_code == 200
        return self

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()

    def health(self) -> dict:
        return httpx.get(self.url + "/health", timeout=HANG_S).json()

    def wait_for(self, what, timeout: float = 300.0) -> dict:
        """Until /health satisfies what(health): the tests wait for the server's state, never for a time (the
        limit only guards against a hang)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            h = self.health()
            if what(h):
                return h
            time.sleep(0.01)
        raise AssertionError(f"/health never satisfied the condition: {self.health()}")

    def wait_idle(self) -> dict:
        return self.wait_for(lambda h: h["active"] == 0 and h["queued"] == 0)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tok4k) -> Path:
    """A random model with a 512-token context: slow enough on CPU (a few ms a token) to overlap requests."""
    import torch

    from tinystories.core.config import RunConfig
    from tinystories.data.tokenizer import load_tokenizer
    from tinystories.model.checkpoint import write_checkpoint_dir
    from tinystories.model.transformer import Transformer

    tok = load_tokenizer(tok4k)
    cfg = RunConfig.model_validate({"model": {"vocab_size": tok.vocab_size, "dim": 128, "n_layers": 4, "n_heads": 4,
                                              "n_kv_heads": 2, "max_seq_len": CONTEXT}})
    torch.manual_seed(0)
    dest = tmp_path_factory.mktemp("serve") / "ck"
    write_checkpoint_dir(dest, Transformer(cfg.model), cfg, tok, {"step": 1234, "metrics": {"val_bpb": 2.5}})
    return dest


@pytest.fixture(scope="module")
def servers(checkpoint):
    # eager decoding: these tests need no compiling (test_compiled_server... covers the default)
    main = Server(checkpoint, "--max-concurrent", "1", "--max-queue", "1", "--timeout", "30", "--no-compile")
    other = Server(checkpoint, "--cors-origin", "http://allowed.example", "--timeout", "0.2", "--no-compile")
    try:
        yield main.wait(), other.wait()
    finally:
        main.stop()
        other.stop()


@pytest.fixture
def server(servers) -> Server:
    servers[0].wait_idle()
    return servers[0]


def sse_events(lines) -> list[tuple[str, str]]:
    """(event name, data) pairs from an iterator of SSE lines."""
    out, name, data = [], "message", []
    for line in lines:
        if line == "":
            if data:
                out.append((name, "\n".join(data)))
            name, data = "message", []
        elif line.startswith("event:"):
            name = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].lstrip())
    return out


def post(server, path, body, timeout: float = HANG_S):
    return httpx.post(server.url + path, json=body, timeout=timeout)


# ------------------------------------------------------------------------------------------------ info


def test_health_model_openapi_and_page(server, checkpoint):
    h = httpx.get(server.url + "/health").json()
    assert h["status"] == "ok" and h["max_concurrent"] == 1 and h["active"] == 0

    m = httpx.get(server.url + "/v1/model").json()
    assert m["architecture"]["dim"] == 128 and m["architecture"]["n_layers"] == 4 and m["context"] == CONTEXT
    assert m["tokenizer"] == {"kind": "bpe", "vocab_size": 4096, "file": "tokenizer.json"}
    assert m["step"] == 1234 and m["val_bpb"] == 2.5
    from tinystories.model.checkpoint import load_model

    model, _ = load_model(checkpoint)
    assert m["parameters"] == model.num_params()

    schema = httpx.get(server.url + "/openapi.json").json()
    assert {"/v1/generate", "/v1/completions", "/v1/model", "/health"} <= set(schema["paths"])
    assert "checkpoint" not in json.dumps(schema["components"]["schemas"]["GenerateRequest"]["properties"])

    models = httpx.get(server.url + "/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == m["name"]

    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert 'id="generate"' in page.text and 'id="stop"' in page.text and "cdn" not in page.text.lower()
    for asset in ("/static/app.js", "/static/style.css"):
        assert httpx.get(server.url + asset).status_code == 200


# ------------------------------------------------------------------------------------------------ /v1/generate


def test_generate_json_matches_the_shared_sampler(server, checkpoint):
    from tinystories.inference.sampling import SamplingParams, generate_texts
    from tinystories.model.checkpoint import load_model

    body = {"prompt": "Once upon a time", "max_new_tokens": 20, "temperature": 0.9, "top_k": 40, "top_p": 0.9,
            "seed": 7}
    r = post(server, "/v1/generate", body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["finish_reason"] in ("stop", "length") and out["tokens"] == len(out["token_ids"]) <= 20
    assert out["completion_tokens"] == out["tokens"] and out["prompt_tokens"] >= 2
    assert out["timing"]["total_s"] > 0 and out["timing"]["tokens_per_s"] > 0
    model, ck = load_model(checkpoint)
    expected = generate_texts(model, ck.tokenizer, body["prompt"],
                              SamplingParams(max_new_tokens=20, temperature=0.9, top_k=40, top_p=0.9, seed=7))[0]
    assert body["prompt"] + out["text"] == expected["text"]
    assert post(server, "/v1/generate", body).json()["text"] == out["text"]  # same seed, same story


def test_generate_stream_with_alternatives(server):
    body = {"prompt": "Tom had a red ball", "max_new_tokens": 12, "seed": 3, "stream": True, "top_alternatives": 5}
    with httpx.stream("POST", server.url + "/v1/generate", json=body, timeout=HANG_S) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r.iter_lines())
    names = [n for n, _ in events]
    assert names[0] == "start" and names[-1] == "done" and set(names[1:-1]) == {"token"}
    tokens = [json.loads(d) for n, d in events if n == "token"]
    for t in tokens:
        probs = [a["prob"] for a in t["top"]]
        assert len(probs) == 5 and probs == sorted(probs, reverse=True) and sum(probs) <= 1.0 + 1e-4
        assert all(isinstance(a["token"], str) and isinstance(a["id"], int) for a in t["top"])
    done = json.loads(events[-1][1])
    assert done["completion_tokens"] == len(tokens) <= 12
    assert done["finish_reason"] in ("stop", "length") and "tokens_per_s" in done["timing"]
    plain = post(server, "/v1/generate", {**body, "stream": False, "top_alternatives": 0}).json()
    assert "".join(t["text"] for t in tokens) == plain["text"]


def test_max_new_tokens_is_capped_by_the_context(server):
    prompt = "the dog " * 240  # ~480 tokens
    r = post(server, "/v1/generate", {"prompt": prompt, "max_new_tokens": CONTEXT, "seed": 1, "temperature": 0})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["prompt_tokens"] + out["max_new_tokens"] == CONTEXT
    assert out["prompt_tokens"] + out["completion_tokens"] <= CONTEXT


# ------------------------------------------------------------------------------------------------ OpenAI


def test_openai_completions(server):
    r = post(server, "/v1/completions", {"model": "anything", "prompt": "Once upon a time", "max_tokens": 5,
                                         "temperature": 0.7, "top_p": 0.9, "seed": 1})
    assert r.status_code == 200, r.text
    c = r.json()
    assert c["object"] == "text_completion" and c["id"].startswith("cmpl-") and isinstance(c["created"], int)
    choice = c["choices"][0]
    assert set(choice) == {"text", "index", "logprobs", "finish_reason"} and choice["index"] == 0
    assert choice["finish_reason"] in ("stop", "length") and isinstance(choice["text"], str)
    u = c["usage"]
    assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"] and u["completion_tokens"] <= 5
    # the random model rarely ends a story within 5 tokens
    assert choice["finish_reason"] == "length" or u["completion_tokens"] < 5

    # a list holding one prompt, and the default max_tokens of 16
    c2 = post(server, "/v1/completions", {"model": "x", "prompt": ["Once upon a time"], "seed": 1}).json()
    assert c2["usage"]["completion_tokens"] <= 16


def test_openai_completions_stream(server):
    body = {"model": "m", "prompt": "One day", "max_tokens": 8, "stream": True, "seed": 2,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=HANG_S) as r:
        assert r.status_code == 200
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert all(c["object"] == "text_completion" for c in chunks)
    texts = [c["choices"][0]["text"] for c in chunks if c["choices"]]
    reasons = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert reasons[-1] in ("stop", "length") and all(x is None for x in reasons[:-1])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] <= 8
    full = post(server, "/v1/completions", {**body, "stream": False, "stream_options": None}).json()
    assert "".join(texts) == full["choices"][0]["text"]


def test_openai_stop_string(server):
    full = post(server, "/v1/completions", {"prompt": "Once", "max_tokens": 30, "seed": 5, "temperature": 0}).json()
    text = full["choices"][0]["text"]
    stop = text[len(text) // 2: len(text) // 2 + 2]
    if not stop.strip():
        pytest.skip("no usable stop string in this sample")
    cut = post(server, "/v1/completions", {"prompt": "Once", "max_tokens": 30, "seed": 5, "temperature": 0,
                                           "stop": [stop]}).json()
    assert cut["choices"][0]["finish_reason"] == "stop"
    assert cut["choices"][0]["text"] == text[: text.find(stop)]


# ------------------------------------------------------------------------------------------------ guards


@pytest.mark.parametrize("body, field, words", [
    ({"temperature": 9}, "temperature", "less than or equal to 5"),
    ({"top_p": 0}, "top_p", "greater than 0"),
    ({"top_k": -1}, "top_k", "greater than or equal to 0"),
    ({"repetition_penalty": 0}, "repetition_penalty", "greater than 0"),
    ({"top_alternatives": 6}, "top_alternatives", "less than or equal to 5"),
    ({"max_new_tokens": 0}, "max_new_tokens", "greater than or equal to 1"),
    ({"max_new_tokens": CONTEXT + 1}, "max_new_tokens", "exceeds the model's context of 512"),
    ({"prompt": "once upon a time " * 200}, "prompt", "context is 512"),
    ({"checkpoint": "/etc/passwd"}, "checkpoint", "Extra inputs are not permitted"),
    ({"model_path": "../x"}, "model_path", "Extra inputs are not permitted"),
    ({"prompt": 5}, "prompt", "valid string"),
])
def test_generate_validation_422(server, body, field, words):
    r = post(server, "/v1/generate", body)
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert any(d["loc"][-1] == field and words in d["msg"] for d in detail), detail


def test_completions_validation_and_bad_bodies(server):
    for body, field in [({"prompt": "x", "max_tokens": 10_000}, "max_tokens"), ({"prompt": "x", "n": 2}, "n"),
                        ({"prompt": ["a", "b"]}, "prompt"), ({"prompt": "x", "file": "/etc/passwd"}, "file"),
                        ({"prompt": "x", "temperature": 3}, "temperature")]:
        r = post(server, "/v1/completions", body)
        assert r.status_code == 422, body
        assert any(d["loc"][-1] == field for d in r.json()["detail"]), r.text
    r = httpx.post(server.url + "/v1/generate", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422 and "JSON" in r.text
    r = httpx.post(server.url + "/v1/generate", content=b'{"prompt": "x"}', headers={"content-type": "text/plain"})
    assert r.status_code == 422  # a cross-site "simple" form post does not start a generation


def test_body_size_limit_413(server):
    big = {"prompt": "a" * 100_000}
    r = post(server, "/v1/generate", big)
    assert r.status_code == 413 and "too large" in r.json()["detail"]

    def chunks():  # no Content-Length: the server counts
        for _ in range(100):
            yield b"x" * 1024

    r = httpx.post(server.url + "/v1/completions", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413
    assert httpx.get(server.url + "/health").status_code == 200


@pytest.mark.parametrize("body, field, words", [
    (b'{"temperature": NaN}', "temperature", "finite number"),
    (b'{"temperature": Infinity}', "temperature", "finite number"),
    (b'{"top_p": -Infinity}', "top_p", "finite number"),
    (b'{"repetition_penalty": NaN}', "repetition_penalty", "finite number"),
    (b'{"temperature": -0.5}', "temperature", "greater than or equal to 0"),
    (b'{"temperature": 1e308}', "temperature", "less than or equal to 5"),
    (b'{"max_new_tokens": -3}', "max_new_tokens", "greater than or equal to 1"),
    (b'{"max_new_tokens": 1e300}', "max_new_tokens", "integer"),
    (b'{"max_new_tokens": 123456789012345678901234567890}', "max_new_tokens", "exceeds the model's context"),
    (b'{"seed": -1}', "seed", "greater than or equal to 0"),
    (b'{"top_k": 1e400}', "top_k", "finite number"),
    (b'{"prompt": "\\ud800 half a character"}', "prompt", "lone surrogate"),
    (b'{"stop": ["\\udfff"]}', "stop", "lone surrogate"),
    (b'{"stop": ["' + b"a" * 501 + b'"]}', "stop", "at most 500 characters"),
])
def test_hostile_values_get_a_clear_422(server, body, field, words):
    # JSON's NaN/Infinity (Python's json reads them) and lone surrogates used to crash the error response (500)
    r = httpx.post(server.url + "/v1/generate", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert any(field in d["loc"] and words in d["msg"] for d in detail), detail


def test_hostile_bodies_on_both_apis_get_4xx(server):
    json_h = {"content-type": "application/json"}
    for path in ("/v1/generate", "/v1/completions"):
        r = httpx.post(server.url + path, content=b'{"prompt": "caf\xe9 \xff"}', headers=json_h)
        assert r.status_code == 400, r.text
        msg = r.json()["detail"] if path == "/v1/generate" else r.json()["error"]["message"]
        assert "not valid UTF-8" in msg and "byte 0xe9 at offset 15" in msg
        r = httpx.post(server.url + path, content=b'{"prompt": "x", "temperature": NaN}', headers=json_h)
        assert r.status_code == 422 and "finite number" in r.text
        r = httpx.post(server.url + path, content=b'{"prompt": "x", "top_p": -1e-300}', headers=json_h)
        assert r.status_code == 422 and "greater than 0" in r.text
        r = post(server, path, {"prompt": "once upon a time " * 300})  # ~1,200 tokens for a 512-token context
        assert r.status_code == 422 and "context is 512" in r.text
        r = post(server, path, {"prompt": "x" * 2_000_000})  # 2 MB
        assert r.status_code == 413 and "too large" in r.text
    r = httpx.post(server.url + "/v1/completions", content=b'{"prompt": ["\\ud83d"]}', headers=json_h)
    assert r.status_code == 422 and "lone surrogate" in r.text
    assert server.health()["errors"] == 0


# ------------------------------------------------------------------------------------------------ API key

KEY = "class-key-1234"


@pytest.fixture(scope="module")
def keyed(checkpoint):
    """A server on every interface with a key from $TINYSTORIES_API_KEY."""
    s = Server(checkpoint, "--host", "0.0.0.0", "--no-compile", "--max-batch", "2",
               env={"TINYSTORIES_API_KEY": KEY})
    try:
        yield s.wait()
    finally:
        s.stop()


def test_api_key_is_required_on_the_api(keyed):
    body = {"prompt": "Once", "max_new_tokens": 3, "seed": 1}
    for path, method, payload in [("/v1/generate", "POST", body), ("/v1/completions", "POST", {"prompt": "x"}),
                                  ("/v1/model", "GET", None), ("/v1/models", "GET", None)]:
        for headers, says in [({}, "no API key"), ({"authorization": "Bearer wrong"}, "wrong API key"),
                              ({"authorization": f"Basic {KEY}"}, "not 'Bearer KEY'"),
                              ({"authorization": f"Bearer {KEY}x"}, "wrong API key")]:
            r = httpx.request(method, keyed.url + path, json=payload, headers=headers, timeout=HANG_S)
            assert r.status_code == 401, (path, headers, r.text)
            assert r.headers["www-authenticate"].startswith("Bearer")
            msg = r.json()["error"]["message"] if path in ("/v1/completions", "/v1/models") else r.json()["detail"]
            assert says in msg and "Authorization: Bearer KEY" in msg, msg
        r = httpx.request(method, keyed.url + path, json=payload, headers={"Authorization": f"Bearer {KEY}"},
                          timeout=HANG_S)
        assert r.status_code == 200, (path, r.text)
    # default deny: any other path needs the key too
    for path in ("/v1", "//v1/generate", "/v2/generate", "/metrics"):
        assert httpx.get(keyed.url + path).status_code == 401, path
    # open: liveness (which says a key is needed), the page and its files, the schema (which declares the key)
    assert httpx.get(keyed.url + "/health").json()["api_key_required"] is True
    assert httpx.get(keyed.url + "/").status_code == 200 and httpx.get(keyed.url + "/static/app.js").status_code == 200
    schema = httpx.get(keyed.url + "/openapi.json").json()
    assert schema["components"]["securitySchemes"]["apiKey"]["scheme"] == "bearer"
    assert schema["paths"]["/v1/generate"]["post"]["security"] == [{"apiKey": []}]
    assert "security" not in schema["paths"]["/health"]["get"]


def test_keyed_server_on_all_interfaces_says_so(keyed):
    out = keyed.output()
    assert f"note: serving on 0.0.0.0:{keyed.port}:" in out and "the API needs the key" in out
    assert "without --api-key" not in out and KEY not in out  # the key itself is never printed


def test_open_server_on_all_interfaces_warns_who_can_reach_it(checkpoint, server):
    assert server.health()["api_key_required"] is False  # the loopback server: no key, no warning
    assert "warning" not in server.output()
    s = Server(checkpoint, "--host", "0.0.0.0", "--no-compile", env={"TINYSTORIES_API_KEY": ""})
    try:
        s.wait()
        assert post(s, "/v1/generate", {"prompt": "x", "max_new_tokens": 1}).status_code == 200
    finally:
        s.stop()
    assert (f"warning: serving on 0.0.0.0:{s.port} without --api-key: anyone who can reach this machine on port "
            f"{s.port} can use it") in s.output()


def test_api_key_flag_must_be_usable(checkpoint):
    from conftest import one_line_error

    one_line_error(run_cli("serve", "--checkpoint", checkpoint, "--api-key", " ", timeout=HANG_S), "--api-key")
    r = run_cli("serve", "--checkpoint", checkpoint, timeout=HANG_S, env={"TINYSTORIES_API_KEY": "k\nk"})
    one_line_error(r, "$TINYSTORIES_API_KEY")


def raw_post(server, path: str, body: dict) -> socket.socket:
    """Send a request on a socket of our own, to close it (a client that leaves) whenever the test decides."""
    data = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return sock


def test_full_queue_429_with_retry_after_and_disconnect_stops_generation(server):
    # --max-concurrent 1 (one row) and --max-queue 1: the third simultaneous request is the first 429
    body = {"prompt": "Once upon a time", "max_new_tokens": 500, "stream": True, "seed": 1}
    before = server.health()
    with httpx.Client(timeout=HANG_S) as client:
        with client.stream("POST", server.url + "/v1/generate", json=body) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            while not next(lines).startswith('data: {"type": "token"'):
                pass
            waiting = raw_post(server, "/v1/generate", {"prompt": "x", "max_new_tokens": 2})
            try:
                h = server.wait_for(lambda h: h["queued"] == 1)
                assert h["active"] == 1 and h["max_concurrent"] == 1 and h["max_queue"] == 1
                busy = post(server, "/v1/generate", {"prompt": "x", "max_new_tokens": 2})
                assert busy.status_code == 429 and busy.headers["Retry-After"] == "1"
                assert "--max-queue 1" in busy.json()["detail"] and "--max-batch 1" in busy.json()["detail"]
                busy = post(server, "/v1/completions", {"prompt": "x", "max_tokens": 2})
                assert busy.status_code == 429 and busy.headers["Retry-After"]
                assert busy.json()["error"]["type"] == "rate_limit_error"
                assert server.health()["rejected"] == before["rejected"] + 2
            finally:
                waiting.close()
        # leaving the block closes the connection mid-stream: the generation leaves the batch before its next step
    h = server.wait_for(lambda h: h["active"] == 0 and h["queued"] == 0)
    assert h["cancelled"] == before["cancelled"] + 2  # the stream (cut short, not run to 500 tokens) and the waiter
    ok = post(server, "/v1/generate", {"prompt": "x", "max_new_tokens": 2})
    assert ok.status_code == 200


def test_non_streaming_disconnect_stops_generation(server):
    # waits for events (the generation running, then the server counting it cancelled), not for a time that
    # depends on the machine's speed (seeded: an unseeded sample could end early on the end-of-story token)
    before = server.health()
    sock = raw_post(server, "/v1/generate", {"prompt": "x", "max_new_tokens": 500, "seed": 1})
    try:
        server.wait_for(lambda h: h["active"] == 1)
    finally:
        sock.close()
    h = server.wait_for(lambda h: h["active"] == 0)
    assert h["cancelled"] == before["cancelled"] + 1 and h["served"] == before["served"] + 1  # cut short


def test_queued_client_disconnect_leaves_the_queue(server):
    body = {"prompt": "Once upon a time", "max_new_tokens": 500, "stream": True, "seed": 2}
    before = server.health()
    with httpx.Client(timeout=HANG_S) as client:
        with client.stream("POST", server.url + "/v1/generate", json=body) as r:
            lines = r.iter_lines()
            while not next(lines).startswith('data: {"type": "token"'):
                pass
            sock = raw_post(server, "/v1/generate", {"prompt": "x", "max_new_tokens": 5})
            server.wait_for(lambda h: h["queued"] == 1)
            sock.close()
            # the waiter leaves the queue while the running generation goes on
            h = server.wait_for(lambda h: h["queued"] == 0)
            assert h["active"] == 1 and h["cancelled"] == before["cancelled"] + 1
            assert h["served"] == before["served"]  # it never ran
            n = sum(line.startswith('data: {"type": "token"') for line, _ in zip(lines, range(40)))
            assert n > 5  # the stream still flows
    server.wait_for(lambda h: h["active"] == 0)


def test_compiled_server_serves_concurrent_requests_like_the_eager_sampler(checkpoint):
    from concurrent.futures import ThreadPoolExecutor

    from tinystories.inference.sampling import SamplingParams, generate_texts
    from tinystories.model.checkpoint import load_model

    srv = Server(checkpoint, "--max-concurrent", "3")  # compiled decoding is the default
    try:
        srv.wait()  # compiling happens before the server listens
        bodies = [{"prompt": p, "max_new_tokens": 40, "seed": i} for i, p in enumerate(["Once", "Tom had", "A cat"])]
        with ThreadPoolExecutor(3) as pool:  # three generations in three threads share the compiled step
            outs = list(pool.map(lambda b: post(srv, "/v1/generate", b, timeout=HANG_S), bodies))
    finally:
        srv.stop()
    log = srv.output()
    assert "compiled in" in log and "warning: compiled decoding failed" not in log, log
    model, ck = load_model(checkpoint)
    for body, r in zip(bodies, outs):
        assert r.status_code == 200, r.text
        params = SamplingParams(max_new_tokens=40, seed=body["seed"])
        expected = generate_texts(model, ck.tokenizer, body["prompt"], params)
        assert body["prompt"] + r.json()["text"] == expected[0]["text"]


# ------------------------------------------------------------------------------------------------ queue, batching


@pytest.fixture(scope="module")
def batch_server(checkpoint):
    s = Server(checkpoint, "--max-batch", "8", "--timeout", "60", "--no-compile")
    try:
        yield s.wait()
    finally:
        s.stop()


def stream_generate(server, body: dict) -> tuple[int, list[dict], dict | None]:
    """(status, token events, done event) of one streaming /v1/generate."""
    with httpx.stream("POST", server.url + "/v1/generate", json={**body, "stream": True}, timeout=HANG_S) as r:
        if r.status_code != 200:
            r.read()
            return r.status_code, [], None
        events = sse_events(r.iter_lines())
    tokens = [json.loads(d) for n, d in events if n == "token"]
    done = next((json.loads(d) for n, d in events if n == "done"), None)
    return 200, tokens, done


@pytest.mark.slow
def test_twenty_simultaneous_clients_are_all_served(batch_server, checkpoint):
    # the case: 20 readers ask for a 64-token story at the same moment; 8 rows, the rest wait their turn
    from concurrent.futures import ThreadPoolExecutor

    from tinystories.inference.sampling import SamplingParams, generate_texts
    from tinystories.model.checkpoint import load_model

    before = batch_server.health()
    bodies = [{"prompt": ["Once upon a time", "Tom had a red ball", "A cat sat"][i % 3], "max_new_tokens": 64,
               "seed": i, "temperature": [0.8, 1.0, 0.5, 0][i % 4], "top_k": [50, 0][i % 2]} for i in range(20)]
    with ThreadPoolExecutor(20) as pool:
        results = list(pool.map(lambda b: stream_generate(batch_server, b), bodies))
    assert [status for status, _, _ in results] == [200] * 20
    for body, (_, tokens, done) in zip(bodies, results):
        assert done is not None and done["finish_reason"] in ("stop", "length")
        assert done["completion_tokens"] == len([t for t in tokens if t["id"] is not None]) <= 64
    h = batch_server.wait_for(lambda h: h["active"] == 0 and h["queued"] == 0)
    assert h["served"] == before["served"] + 20 and h["rejected"] == before["rejected"] and h["errors"] == 0
    # each story is the one the shared sampler writes alone with the same seed (a few checked)
    model, ck = load_model(checkpoint)
    for body, (_, tokens, _) in list(zip(bodies, results))[:4]:
        params = SamplingParams(max_new_tokens=64, temperature=body["temperature"], top_k=body["top_k"] or None,
                                top_p=0.95, seed=body["seed"])
        expected = generate_texts(model, ck.tokenizer, body["prompt"], params)[0]["text"]
        assert body["prompt"] + "".join(t["text"] for t in tokens) == expected


def test_seeded_request_same_alone_and_inside_a_busy_batch(batch_server):
    sampled = {"prompt": "Tom had a red ball", "max_new_tokens": 40, "temperature": 0.9, "top_k": 40, "seed": 11}
    greedy = {"prompt": "Once upon a time", "max_new_tokens": 40, "temperature": 0, "repetition_penalty": 1.2}
    batch_server.wait_for(lambda h: h["active"] == 0)
    alone = [post(batch_server, "/v1/generate", b, timeout=HANG_S).json() for b in (sampled, greedy)]
    others = [{"prompt": "A cat", "max_new_tokens": 400, "stream": True, "seed": 100 + i, "temperature": 1.0,
               "top_alternatives": 5 * (i % 2), "repetition_penalty": 1.0 + 0.1 * i} for i in range(3)]
    with httpx.Client(timeout=HANG_S) as client:
        streams = [client.stream("POST", batch_server.url + "/v1/generate", json=b) for b in others]
        responses = [st.__enter__() for st in streams]
        try:
            for r in responses:  # all are decoding (their first token arrived)
                lines = r.iter_lines()
                while not next(lines).startswith('data: {"type": "token"'):
                    pass
            busy = [post(batch_server, "/v1/generate", b, timeout=HANG_S).json() for b in (sampled, greedy)]
            # others (started before, 400 tokens each) outlived both requests: they shared the batch all along
            # (one of them may have ended on its own end-of-story token meanwhile)
            assert batch_server.health()["active"] >= 1
        finally:
            for st in streams:
                st.__exit__(None, None, None)
    for a, b in zip(alone, busy):
        assert a["token_ids"] == b["token_ids"] and a["text"] == b["text"] and a["finish_reason"] == b["finish_reason"]


@pytest.fixture(scope="module")
def queue_server(checkpoint):
    # a timeout far shorter than the 500-token story in front (the 503's message shows a generation running)
    s = Server(checkpoint, "--max-batch", "1", "--max-queue", "4", "--queue-timeout", "0.02", "--no-compile")
    try:
        yield s.wait()
    finally:
        s.stop()


def test_queue_timeout_503(queue_server):
    body = {"prompt": "Once upon a time", "max_new_tokens": 500, "stream": True, "seed": 1}
    with httpx.Client(timeout=HANG_S) as client:
        with client.stream("POST", queue_server.url + "/v1/generate", json=body) as r:
            lines = r.iter_lines()
            while not next(lines).startswith('data: {"type": "token"'):
                pass
            late = post(queue_server, "/v1/generate", {"prompt": "x", "max_new_tokens": 2})
            assert late.status_code == 503 and late.headers["Retry-After"] == "1"
            assert "in the queue" in late.json()["detail"] and "--queue-timeout 0.02" in late.json()["detail"]
            late = post(queue_server, "/v1/completions", {"prompt": "x", "max_tokens": 2})
            assert late.status_code == 503 and late.json()["error"]["code"] == "queue_timeout"
    h = queue_server.wait_for(lambda h: h["active"] == 0)
    assert h["queue_timeouts"] == 2


# ------------------------------------------------------------------------------------------------ CORS, timeout


def test_cors_closed_by_default(server):
    pre = httpx.options(server.url + "/v1/generate", headers={
        "Origin": "http://evil.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type"})
    assert "access-control-allow-origin" not in pre.headers
    r = httpx.get(server.url + "/v1/model", headers={"Origin": "http://evil.example"})
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers


def test_cors_when_configured(servers):
    other = servers[1]
    pre = httpx.options(other.url + "/v1/generate", headers={
        "Origin": "http://allowed.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type"})
    assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == "http://allowed.example"
    bad = httpx.options(other.url + "/v1/generate", headers={
        "Origin": "http://evil.example", "Access-Control-Request-Method": "POST"})
    assert bad.headers.get("access-control-allow-origin") != "http://evil.example"


def test_request_time_limit(servers):
    # the same seeded request with no effective limit (main: --timeout 30) is the reference, measured in this run
    # on this machine; the other server (--timeout 0.2) must cut it at its limit: after 0.2 s, before the story
    # ends, and with the beginning of the same story
    main, other = servers
    body = {"prompt": "x", "max_new_tokens": 500, "temperature": 1.0, "seed": 1, "repetition_penalty": 1.1}
    ref = post(main, "/v1/generate", body).json()
    out = post(other, "/v1/generate", body).json()
    assert ref["finish_reason"] == "length" and ref["completion_tokens"] == 500

    def active_s(r):  # admission to the end, by the server's own clock
        return r["timing"]["total_s"] - r["timing"]["queued_s"]

    if active_s(ref) > 2 * 0.2:  # the reference needed well over the limit: the limit must have cut this one
        assert out["finish_reason"] == "timeout", out
    if out["finish_reason"] == "timeout":
        # cut before the end of the same story (fewer of the same seeded tokens), and not before the limit
        assert out["completion_tokens"] < ref["completion_tokens"]
        assert out["token_ids"] == ref["token_ids"][: out["completion_tokens"]]
        assert active_s(out) >= 0.2 - 1e-3  # (the timings are rounded to 0.1 ms)
    else:  # a machine that writes the whole story within the limit
        assert out["token_ids"] == ref["token_ids"] and out["finish_reason"] == "length"


# ------------------------------------------------------------------------------------------------ shutdown


def _client(url: str, path: str, body: dict, first_token: threading.Event | None = None) -> dict:
    """One request, to its end: status, the streamed events (a stream) or the JSON body; any transport error.
    `first_token` is set when a stream's first token event arrives (or when the request ends without one)."""
    out: dict = {"status": None, "events": [], "json": None, "error": None}
    try:
        with httpx.stream("POST", url + path, json=body, timeout=HANG_S) as r:
            out["status"] = r.status_code
            if r.status_code != 200 or not body.get("stream"):
                text = r.read().decode()
                try:
                    out["json"] = json.loads(text)
                except ValueError:
                    out["error"] = f"not JSON: {text[:200]!r}"
            else:
                name = "message"
                for line in r.iter_lines():
                    if line.startswith("event:"):
                        name = line[6:].strip()
                    elif line.startswith("data:"):
                        out["events"].append((name, line[5:].strip()))
                        if first_token and (name == "token" or path == "/v1/completions"):
                            first_token.set()
    except httpx.HTTPError as e:
        out["error"] = f"{type(e).__name__}: {e}"
    finally:
        if first_token:
            first_token.set()
    return out


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_shutdown_ends_running_requests_and_refuses_queued_ones(checkpoint, sig):
    # three rows running (a stream, a JSON request, an OpenAI stream) and two requests queued behind them when
    # the signal comes: each running one ends with its reason, each queued one gets 503, and the process exits
    # of itself: no request is left for uvicorn's graceful-shutdown timeout to cut off
    from concurrent.futures import ThreadPoolExecutor

    srv = Server(checkpoint, "--max-batch", "3", "--max-queue", "4", "--timeout", "600", "--no-compile").wait()
    long = {"prompt": "Once upon a time", "max_new_tokens": 500, "seed": 1}
    running = [("/v1/generate", {**long, "stream": True}), ("/v1/generate", long),
               ("/v1/completions", {"prompt": "Once upon a time", "max_tokens": 500, "seed": 1, "stream": True})]
    queued = [("/v1/generate", {"prompt": "x", "max_new_tokens": 5, "stream": True}),
              ("/v1/completions", {"prompt": "x", "max_tokens": 5})]
    try:
        with ThreadPoolExecutor(len(running) + len(queued)) as pool:
            started = [threading.Event() if body.get("stream") else None for _, body in running]
            run_f = [pool.submit(_client, srv.url, path, body, ev) for (path, body), ev in zip(running, started)]
            for ev in started:
                if ev:
                    assert ev.wait(HANG_S)
            srv.wait_for(lambda h: h["active"] == 3)
            queue_f = [pool.submit(_client, srv.url, path, body) for path, body in queued]
            srv.wait_for(lambda h: h["queued"] == 2)
            srv.proc.send_signal(sig)
            ran = [f.result() for f in run_f]
            waited = [f.result() for f in queue_f]
        rc = srv.proc.wait(HANG_S)  # a hang guard: it exits as soon as the requests have their endings
    finally:
        if srv.proc.poll() is None:
            srv.proc.kill()
    log = srv.output()
    assert rc in (0, -sig, 128 + sig), (rc, log)
    assert "timeout graceful shutdown exceeded" not in log and "Traceback" not in log, log

    # running: the native stream ends with its done event, finish_reason "shutdown", the tokens so far
    stream, plain, openai = ran
    assert stream["error"] is None and stream["status"] == 200, stream
    names = [n for n, _ in stream["events"]]
    assert names[0] == "start" and names[-1] == "done" and "token" in names, names
    done = json.loads(stream["events"][-1][1])
    assert done["finish_reason"] == "shutdown" and done["completion_tokens"] == names.count("token") < 500
    # the JSON request: its text so far, finish_reason "shutdown" (as "timeout" is reported)
    assert plain["error"] is None and plain["status"] == 200, plain
    assert plain["json"]["finish_reason"] == "shutdown" and 0 < plain["json"]["completion_tokens"] < 500
    # the OpenAI stream: its chunks so far, then an error chunk (OpenAI has no finish_reason for it) and [DONE]
    assert openai["error"] is None and openai["status"] == 200, openai
    data = [d for _, d in openai["events"]]
    assert data[-1] == "[DONE]" and json.loads(data[-2])["error"]["code"] == "shutdown", data[-3:]
    assert all(json.loads(d)["choices"][0]["finish_reason"] is None for d in data[:-2])
    # queued: 503 with Retry-After, in each API's error format
    for (path, _), w in zip(queued, waited):
        assert w["error"] is None and w["status"] == 503, w
        msg = w["json"]["detail"] if path == "/v1/generate" else w["json"]["error"]["message"]
        assert "shutting down" in msg
    assert waited[1]["json"]["error"]["code"] == "shutdown"


def test_cli_rejects_bad_options(checkpoint):
    r = run_cli("serve", "--checkpoint", checkpoint, "--max-concurrent", "0", timeout=HANG_S)
    assert r.returncode == 2 and "--max-concurrent 0" in r.stderr


def test_cli_rejects_bad_queue_options(checkpoint):
    from conftest import one_line_error

    one_line_error(run_cli("serve", "--checkpoint", checkpoint, "--max-queue", "-1", timeout=HANG_S), "--max-queue -1")
    r = run_cli("serve", "--checkpoint", checkpoint, "--max-batch", "2", "--max-concurrent", "3", timeout=HANG_S)
    one_line_error(r, "--max-batch 2", "--max-concurrent 3", "old name")


def test_port_in_use_is_one_line_before_the_model_loads(checkpoint, tmp_path):
    from conftest import one_line_error

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = run_cli("serve", "--checkpoint", checkpoint, "--port", port, timeout=HANG_S)
        one_line_error(r, f"port {port} is already in use", "--port")
        # checked before the checkpoint is read: a missing one still fails on the port first
        r = run_cli("serve", "--checkpoint", tmp_path / "nope", "--port", port, "--no-compile", timeout=HANG_S)
        one_line_error(r, f"port {port} is already in use")
    assert "uvicorn" not in r.stdout.lower()
