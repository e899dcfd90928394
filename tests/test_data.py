"""Raw-text ingestion: formats, bad input, and the Hub download against a local server that speaks its protocol."""

from __future__ import annotations

import hashlib
import http.server
import json
import threading

import pytest

from conftest import DATA_DIR, TRAIN_HEAD, VALID_HEAD, one_line_error, run_cli
from tinystories.core.errors import UserError
from tinystories.data.text import iter_documents, list_text_files, split_files


def test_official_format_splits_at_endoftext():
    docs = list(iter_documents([TRAIN_HEAD]))
    assert len(docs) == 2316  # the shared README's count
    assert docs[0].startswith("One day, a little girl named Lily found a needle")
    assert all("<|endoftext|>" not in d for d in docs)
    assert all(d == d.strip() for d in docs)


def test_one_paragraph_per_line_file_is_one_document():
    docs = list(iter_documents([VALID_HEAD]))
    assert len(docs) == 1
    assert docs[0].count("\n") > 4000


def test_json_jsonl_and_blank_line_text(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([{"story": "Tom ran."}, {"story": "Sue sat.", "summary": "x"}]))
    (tmp_path / "b.jsonl").write_text('{"story": "A cat."}\n\n{"text": "A dog."}\n')
    (tmp_path / "c.txt").write_text("First story.\nStill first.\n\nSecond story.\n")
    docs = list(iter_documents(list_text_files(tmp_path)))
    assert docs == ["Tom ran.", "Sue sat.", "A cat.", "A dog.", "First story.\nStill first.", "Second story."]


def test_split_by_file_name():
    train, val = split_files(list_text_files(DATA_DIR))
    assert [p.name for p in train] == ["TinyStories-train-head.txt"]
    assert [p.name for p in val] == ["TinyStories-valid-head.txt"]


@pytest.mark.parametrize("name,content,needle", [
    ("empty.txt", b"", "empty"),
    ("bad.txt", b"Once upon a time\n\xff\xfe broken\n", "invalid UTF-8 at byte 17"),
    ("bad.json", b"[{\"story\": 1}]", "no 'story'"),
    ("bad2.json", b"{not json", "not valid JSON"),
    ("data.csv", b"a,b\n", "unknown format"),
])
def test_bad_files_give_one_line_errors(tmp_path, name, content, needle):
    f = tmp_path / name
    f.write_bytes(content)
    with pytest.raises(UserError, match=needle):
        list(iter_documents([f]))


def test_missing_path_cli_error(tmp_path):
    r = run_cli("tokenizer", "train", "--from", tmp_path / "nope.txt", "--out", tmp_path / "t")
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "nope.txt" in r.stderr and "Traceback" not in r.stderr
    assert "--from" in r.stderr


def test_missing_path_hint_names_the_flag_of_the_command(tmp_path):
    # `train` takes its text from --data (or data.source), not --from
    r = run_cli("train", "--config", "configs/cpu.yaml", "--data", tmp_path / "nope.txt", "--out", tmp_path / "run")
    line = one_line_error(r, "nope.txt", "--data", "data.source")
    assert "--from" not in line
    r = run_cli("train", "--config", "configs/cpu.yaml", "--set", f"data.data_dir={tmp_path / 'empty'}",
                "--out", tmp_path / "run")
    line = one_line_error(r, "no raw text found", "--data")
    assert "--from" not in line
    assert not (tmp_path / "run").exists()
    empty = tmp_path / "emptydir"
    empty.mkdir()
    one_line_error(run_cli("tokenizer", "train", "--from", empty, "--out", tmp_path / "t"), "no text files", "--from")
    # quickstart names its --data or $TINYSTORIES_DATA
    r = run_cli("quickstart", "--data", tmp_path / "nope", "--out", tmp_path / "qs", "--data-dir", tmp_path / "d")
    assert "--from" not in one_line_error(r, "--data", "nope")
    r = run_cli("quickstart", "--out", tmp_path / "qs", "--data-dir", tmp_path / "d",
                env={"TINYSTORIES_DATA": str(tmp_path / "gone")})
    one_line_error(r, "$TINYSTORIES_DATA", "gone")
    assert not (tmp_path / "qs").exists()


@pytest.mark.parametrize("extra,needle", [
    (["--val-fraction", "1.5"], "--val-fraction 1.5"),
    (["--val-fraction", "-1"], "--val-fraction -1"),
    (["--val-fraction", "1"], "--val-fraction 1"),
    (["--max-stories", "0"], "--max-stories 0"),
    (["--max-stories", "-3"], "--max-stories -3"),
])
def test_prepare_rejects_out_of_range_options(tmp_path, tok4k, extra, needle):
    r = run_cli("data", "prepare", "--tokenizer", tok4k, "--from", TRAIN_HEAD, "--data-dir", tmp_path / "d", *extra)
    one_line_error(r, needle)
    assert not (tmp_path / "d").exists()  # rejected before anything was built


def test_no_validation_split_is_said(tmp_path, tok4k, stories300):
    r = run_cli("data", "prepare", "--tokenizer", tok4k, "--from", stories300, "--data-dir", tmp_path / "d",
                "--val-fraction", "0")
    assert r.returncode == 0, r.stderr
    notes = [line for line in r.stdout.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "--val-fraction 0" in notes[0] and "train split" in notes[0], r.stdout
    r = run_cli("data", "prepare", "--tokenizer", tok4k, "--from", stories300, "--data-dir", tmp_path / "d",
                "--val-fraction", "0.1")
    assert r.returncode == 0 and "note:" not in r.stdout, r.stdout

    # what `train` and `quickstart` print (ensure_run_data): the config key, once
    from tinystories.core.config import load_config
    from tinystories.data.prepare import ensure_run_data

    logged: list[str] = []
    cfg = load_config(None, [f"data.source={stories300}", f"data.data_dir={tmp_path / 'd'}",
                             f"tokenizer.path={tok4k}", "data.val_fraction=0"])
    _, cache = ensure_run_data(cfg, logged.append)
    assert cache.manifest["splits"]["val"]["tokens"] == 0
    notes = [line for line in logged if line.startswith("note:")]
    assert len(notes) == 1 and "data.val_fraction=0" in notes[0] and "memorisation" in notes[0], logged


class _HubHandler(http.server.BaseHTTPRequestHandler):
    """Answers huggingface_hub's file requests: /datasets/{repo}/resolve/{rev}/{file}, HEAD and (ranged) GET."""

    files: dict[str, bytes] = {}
    requests: list[str] = []

    def log_message(self, *a):
        pass

    def _lookup(self):
        name = self.path.split("?")[0].rsplit("/", 1)[-1]
        if "/datasets/roneneldan/TinyStories/resolve/" not in self.path or name not in self.files:
            self.send_response(404)
            self.send_header("X-Error-Code", "EntryNotFound")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return None
        return self.files[name]

    def _headers(self, body: bytes, start: int = 0):
        self.send_header("ETag", '"' + hashlib.sha1(body).hexdigest() + '"')
        self.send_header("X-Repo-Commit", "a" * 40)
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(len(body) - start))

    def do_HEAD(self):
        self.requests.append("HEAD " + self.path)
        body = self._lookup()
        if body is not None:
            self.send_response(200)
            self._headers(body)
            self.end_headers()

    def do_GET(self):
        self.requests.append("GET " + self.path)
        body = self._lookup()
        if body is None:
            return
        start = 0
        rng = self.headers.get("Range")
        if rng and rng.startswith("bytes="):
            start = int(rng[6:].split("-")[0])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        self._headers(body, start)
        self.end_headers()
        self.wfile.write(body[start:])


@pytest.fixture()
def hub_server():
    train = TRAIN_HEAD.read_bytes()[:200_000]
    _HubHandler.files = {"TinyStoriesV2-GPT4-train.txt": train,
                         "TinyStoriesV2-GPT4-valid.txt": VALID_HEAD.read_bytes()[:50_000]}
    _HubHandler.requests = []
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _HubHandler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}", _HubHandler
    srv.shutdown()


def test_fetch_downloads_from_the_hub_endpoint(tmp_path, hub_server):
    url, handler = hub_server
    env = {"HF_ENDPOINT": url, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_DISABLE_XET": "1",
           "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_OFFLINE": "0"}
    r = run_cli("data", "fetch", "--data-dir", tmp_path / "data", env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    raw = tmp_path / "data" / "raw"
    assert (raw / "TinyStoriesV2-GPT4-train.txt").read_bytes() == handler.files["TinyStoriesV2-GPT4-train.txt"]
    assert (raw / "TinyStoriesV2-GPT4-valid.txt").read_bytes() == handler.files["TinyStoriesV2-GPT4-valid.txt"]
    assert any(req.startswith("GET /datasets/roneneldan/TinyStories/resolve/") for req in handler.requests)
    # a second fetch finds the files already there: no new download
    downloads = lambda: sum(req.startswith("GET /datasets/") for req in handler.requests)  # noqa: E731
    n_get = downloads()
    assert n_get == 2
    r = run_cli("data", "fetch", "--data-dir", tmp_path / "data", env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert downloads() == n_get


def test_fetch_offline_says_how_to_use_local_files(tmp_path):
    env = {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path / "hf")}
    r = run_cli("data", "fetch", "--data-dir", tmp_path / "data", env=env, timeout=120)
    assert r.returncode == 2
    assert "--from" in r.stderr and "Traceback" not in r.stderr and r.stderr.count("\n") == 1


def test_fetch_from_local_dir(tmp_path):
    r = run_cli("data", "fetch", "--from", DATA_DIR, "--data-dir", tmp_path / "data")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "data" / "raw" / "TinyStories-train-head.txt").read_bytes() == TRAIN_HEAD.read_bytes()


class _DroppingHubHandler(_HubHandler):
    """The Hub protocol with sha256 ETags (as for LFS files); `drop_after`: the first GET of the big file sends that
    many bytes, then the connection is cut and the server closes (the network is gone); `head_size` overrides the
    size a HEAD announces."""

    drop_after: int | None = None
    head_size: int | None = None
    server = None
    ranges: list[str] = []

    def _headers(self, body: bytes, start: int = 0):
        self.send_header("ETag", '"' + hashlib.sha256(body).hexdigest() + '"')
        self.send_header("X-Repo-Commit", "a" * 40)
        self.send_header("Accept-Ranges", "bytes")
        size = self.head_size if self.head_size and self.command == "HEAD" else len(body)
        self.send_header("Content-Length", str(size - start))

    def do_GET(self):
        body = self._lookup()
        if body is None:
            return
        rng = self.headers.get("Range")
        type(self).ranges.append(rng or "")
        start = int(rng[6:].split("-")[0]) if rng and rng.startswith("bytes=") else 0
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        self._headers(body, start)
        self.end_headers()
        cut = type(self).drop_after
        if cut is None or len(body) < cut:
            self.wfile.write(memoryview(body)[start:])
            return
        type(self).drop_after = None
        self.wfile.write(memoryview(body)[start:cut])
        self.wfile.flush()
        import socket

        self.connection.shutdown(socket.SHUT_RDWR)  # mid-body: the client got `cut` of len(body) bytes
        self.close_connection = True
        srv = type(self).server
        threading.Thread(target=lambda: (srv.shutdown(), srv.server_close()), daemon=True).start()


def _serve(handler):
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    handler.server = srv
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv, f"http://127.0.0.1:{srv.server_address[1]}"


def _hub_env(tmp_path, url):
    return {"HF_ENDPOINT": url, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_DISABLE_XET": "1",
            "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_OFFLINE": "0"}


@pytest.mark.slow
def test_fetch_resumes_after_the_connection_drops_part_way(tmp_path):
    import random

    big = random.Random(0).randbytes(200_000_000)  # a 200 MB file, made here
    files = {"TinyStoriesV2-GPT4-train.txt": big, "TinyStoriesV2-GPT4-valid.txt": VALID_HEAD.read_bytes()[:50_000]}

    class First(_DroppingHubHandler):
        drop_after = 60_000_000
        ranges: list[str] = []

    First.files = files
    srv, url = _serve(First)
    r = run_cli("data", "fetch", "--data-dir", tmp_path / "data", env=_hub_env(tmp_path, url), timeout=600)
    raw = tmp_path / "data" / "raw"
    # the network went away after 60 MB: a one-line error, and what arrived is kept
    assert r.returncode == 2 and "rerun resumes" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert r.stderr.strip().count("\n") == 0
    part = raw / ".TinyStoriesV2-GPT4-train.txt.part"
    kept = part.stat().st_size
    assert 0 < kept <= 60_000_000 and part.read_bytes() == big[:kept]
    assert not (raw / "TinyStoriesV2-GPT4-train.txt").exists()

    class Second(_DroppingHubHandler):
        ranges: list[str] = []

    Second.files = files
    srv2, url2 = _serve(Second)
    try:
        r = run_cli("data", "fetch", "--data-dir", tmp_path / "data", env=_hub_env(tmp_path, url2), timeout=600)
    finally:
        srv2.shutdown()
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"resuming at {kept / 1e6:,.1f} MB" in r.stdout
    assert Second.ranges[0] == f"bytes={kept}-"  # only the rest was sent
    got = (raw / "TinyStoriesV2-GPT4-train.txt").read_bytes()
    assert hashlib.sha256(got).hexdigest() == hashlib.sha256(big).hexdigest()
    valid = "TinyStoriesV2-GPT4-valid.txt"
    assert not part.exists() and (raw / valid).read_bytes() == files[valid]


def test_fetch_checks_free_disk_space_first(tmp_path):
    class Huge(_DroppingHubHandler):
        head_size = 10**16  # 10 PB announced
        ranges: list[str] = []

    Huge.files = {"TinyStoriesV2-GPT4-train.txt": b"x" * 1000, "TinyStoriesV2-GPT4-valid.txt": b"y" * 1000}
    srv, url = _serve(Huge)
    try:
        r = run_cli("data", "fetch", "--data-dir", tmp_path / "data", env=_hub_env(tmp_path, url), timeout=120)
    finally:
        srv.shutdown()
    line = one_line_error(r, "free disk", "GB", "--data-dir")
    assert "needs 20000000.10 GB" in line  # both files announce 10 PB; + a 0.1 GB margin
    assert Huge.ranges == []  # nothing downloaded
