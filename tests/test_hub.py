"""Model card of `export --format hf`, and `--push-to-hub` against a local HTTP server that answers the Hub
endpoints huggingface_hub's real client calls (create repo, create branch, validate README metadata, preupload,
LFS batch + upload, commit), the way test_data's download test serves file requests."""

from __future__ import annotations

import base64
import hashlib
import http.server
import json
import threading
from pathlib import Path
from urllib.parse import unquote

import pytest
import yaml

from conftest import one_line_error, run_cli

WRITER, READER = "hf_test_writer_token", "hf_test_read_only_token"
USERS = {WRITER: ("alice", "write"), READER: ("alice", "read")}


class _Hub(http.server.BaseHTTPRequestHandler):
    """A Hub that keeps repositories in memory: repos[repo_id] = {"private": bool, "branches": {name: {path: data}}}."""

    repos: dict = {}
    lfs: dict = {}
    requests: list = []
    base = ""

    def log_message(self, *a):
        pass

    def _reply(self, code: int, obj=None, headers: dict | None = None):
        body = json.dumps(obj if obj is not None else {}).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _user(self, write: bool):
        """(user, None) or (None, error already sent)."""
        auth = self.headers.get("Authorization", "")
        token = auth[7:] if auth.startswith("Bearer ") else None
        if token not in USERS:
            self._reply(401, {"error": "Invalid credentials in Authorization header"},
                        {"X-Error-Message": "Invalid credentials"})
            return None
        user, scope = USERS[token]
        return user, scope

    def _may_write(self, repo_id: str) -> bool:
        who = self._user(True)
        if who is None:
            return False
        user, scope = who
        if scope != "write" or repo_id.split("/")[0] != user:
            self._reply(403, {"error": f"You don't have the rights to write to {repo_id}"})
            return False
        return True

    def do_GET(self):
        self.requests.append("GET " + self.path)
        path = self.path.split("?")[0]
        if path.startswith("/api/models/"):
            repo_id = "/".join(path.split("/")[3:5])
            if self._user(False) is None:
                return
            if repo_id in self.repos:
                return self._reply(200, {"id": repo_id, "modelId": repo_id, "sha": "0" * 40,
                                         "private": self.repos[repo_id]["private"]})
            return self._reply(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
        self._reply(404, {"error": "not found"})

    def do_PUT(self):
        self.requests.append("PUT " + self.path)
        data = self._body()
        oid = self.path.split("/")[-1]
        if hashlib.sha256(data).hexdigest() != oid:
            return self._reply(400, {"error": "sha256 mismatch"})
        self.lfs[oid] = data
        self._reply(200)

    def do_POST(self):
        self.requests.append("POST " + self.path)
        path, body = self.path.split("?")[0], self._body()
        parts = [unquote(p) for p in path.split("/")]
        if path == "/api/repos/create":
            req = json.loads(body)
            repo_id = f"{req['organization']}/{req['name']}"
            if not self._may_write(repo_id):
                return
            if repo_id in self.repos:
                return self._reply(409, {"error": "You already created this model repo",
                                         "url": f"{self.base}/{repo_id}"})
            self.repos[repo_id] = {"private": req.get("visibility") == "private", "branches": {"main": {}}}
            return self._reply(200, {"url": f"{self.base}/{repo_id}"})
        if path == "/api/validate-yaml":
            content = json.loads(body)["content"]
            try:
                meta = yaml.safe_load(content.split("---")[1]) if content.startswith("---") else None
                ok = isinstance(meta, dict)
            except yaml.YAMLError:
                ok = False
            return self._reply(200 if ok else 400, {"errors": [] if ok else [{"message": "invalid YAML metadata"}],
                                                    "warnings": []})
        if path.endswith(".git/info/lfs/objects/batch"):
            repo_id = path[1:].removesuffix(".git/info/lfs/objects/batch")
            if not self._may_write(repo_id):
                return
            objs = []
            for o in json.loads(body)["objects"]:
                upload = {"upload": {"href": f"{self.base}/lfs-upload/{o['oid']}"}}
                objs.append({"oid": o["oid"], "size": o["size"], "authenticated": True,
                             **({} if o["oid"] in self.lfs else {"actions": upload})})
            return self._reply(200, {"transfer": "basic", "objects": objs})
        if len(parts) >= 6 and parts[1:3] == ["api", "models"]:
            repo_id, action, rev = f"{parts[3]}/{parts[4]}", parts[5], "/".join(parts[6:])
            if repo_id not in self.repos:
                return self._reply(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
            if not self._may_write(repo_id):
                return
            branches = self.repos[repo_id]["branches"]
            if action == "branch":
                if rev in branches:
                    return self._reply(409, {"error": "Reference already exists"})
                branches[rev] = dict(branches["main"])
                return self._reply(200)
            if rev not in branches:
                return self._reply(404, {"error": f"Invalid rev id: {rev}"}, {"X-Error-Code": "RevisionNotFound"})
            if action == "preupload":
                files = [{"path": f["path"], "shouldIgnore": False, "oid": None,
                          "uploadMode": "lfs" if f["path"].endswith((".safetensors", ".gguf")) else "regular"}
                         for f in json.loads(body)["files"]]
                return self._reply(200, {"files": files})
            if action == "commit":
                staged = {}
                for line in body.decode().splitlines():
                    item = json.loads(line)
                    v = item["value"]
                    if item["key"] == "file":
                        staged[v["path"]] = base64.b64decode(v["content"])
                    elif item["key"] == "lfsFile":
                        if v["oid"] not in self.lfs:
                            return self._reply(422, {"error": f"LFS object {v['oid']} was not uploaded"})
                        staged[v["path"]] = self.lfs[v["oid"]]
                branches[rev].update(staged)  # all files of a commit at once
                sha = hashlib.sha1(repr(sorted(staged)).encode()).hexdigest()
                return self._reply(200, {"commitUrl": f"{self.base}/{repo_id}/commit/{sha}", "commitOid": sha})
        self._reply(404, {"error": "not found"})


@pytest.fixture()
def hub(tmp_path):
    _Hub.repos, _Hub.lfs, _Hub.requests = {}, {}, []
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hub)
    _Hub.base = f"http://127.0.0.1:{srv.server_address[1]}"
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    env = {"HF_ENDPOINT": _Hub.base, "HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_DISABLE_XET": "1",
           "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_OFFLINE": "0", "HF_TOKEN": WRITER, "TRANSFORMERS_OFFLINE": "1"}
    yield _Hub, env
    srv.shutdown()




def _card(path: Path) -> tuple[dict, str]:
    text = path.read_text(encoding="utf-8")
    assert text.startswith("---\n")
    _, meta, body = text.split("---\n", 2)
    return yaml.safe_load(meta), body


@pytest.mark.slow
def test_model_card_of_a_trained_run(tiny_bpe_run, tmp_path):
    """The card of a trained run: Hub metadata, architecture, training figures from the run, the eval table of an
    `eval --json` report in the run directory, a sample story, how to load it."""
    from tinystories.model.checkpoint import read_checkpoint

    report = tiny_bpe_run / "eval.json"
    r = run_cli("eval", "--checkpoint", tiny_bpe_run, "--num-stories", "2", "--max-new-tokens", "24",
                "--max-tokens", "2000", "--json", report)
    assert r.returncode == 0, r.stderr
    out = tmp_path / "hf"
    r = run_cli("export", "--format", "hf", "--checkpoint", tiny_bpe_run, "--out", out)
    assert r.returncode == 0, r.stderr
    assert "model card README.md" in r.stdout
    meta, body = _card(out / "README.md")
    assert meta["datasets"] == ["roneneldan/TinyStories"] and meta["language"] == ["en"]
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    assert meta["license"] and "tinystories" in meta["tags"]
    ck = read_checkpoint(tiny_bpe_run)
    st, rep = ck.state, json.loads(report.read_text())
    m = ck.cfg.model
    assert f"| layers / width / FFN width | {m.n_layers} / {m.dim} / {m.ffn_dim} |" in body
    assert f"byte-level BPE (GPT-2 style) with {ck.tokenizer.vocab_size:,} tokens" in body
    assert f"| steps | {st['step']:,} |" in body and f"| tokens seen | {st['tokens']:,} |" in body
    assert f"| final validation loss | {st['metrics']['val_loss']:.4f} per token |" in body
    assert f"| final validation bits per byte | {st['metrics']['val_bpb']:.4f} |" in body
    assert "| training time | " in body and "| training time | - |" not in body
    assert f"| bits per byte | {rep['bits_per_byte']:.4f} |" in body and "generated stories vs real ones" in body
    assert "> Once upon a time" in body
    assert "AutoModelForCausalLM.from_pretrained('PATH/TO/EXPORT')" in body


@pytest.mark.slow
def test_model_card_of_an_import(s260, tmp_path):
    out = tmp_path / "hf"
    r = run_cli("export", "--format", "hf", "--checkpoint", s260, "--out", out)
    assert r.returncode == 0, r.stderr
    meta, body = _card(out / "README.md")
    assert meta["license"] == "mit" and "llama2.c" in meta["tags"]
    assert "Imported from a [llama2.c]" in body and "`stories260K.bin`" in body and "SentencePiece (512 tokens)" in body
    assert "| parameters | 260,032 |" in body  # stories260K: 5 x 45,440 (layers) + 32,768 (tied embedding) + 64
    assert "> Once upon a time" in body and "## Evaluation" not in body  # no eval report for it


@pytest.mark.slow
def test_push_hf_export_to_the_hub(s260, hub, tmp_path):
    server, env = hub
    out = tmp_path / "hf"
    r = run_cli("export", "--format", "hf", "--checkpoint", s260, "--out", out, "--push-to-hub", "alice/stories260k",
                "--private", env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert f"pushed {out} to alice/stories260k: {server.base}/alice/stories260k/commit/" in r.stdout
    repo = server.repos["alice/stories260k"]
    assert repo["private"] is True
    files = repo["branches"]["main"]
    assert sorted(files) == sorted(p.name for p in out.iterdir())
    assert all(files[p.name] == p.read_bytes() for p in out.iterdir())  # the weights went by LFS, byte for byte
    assert any(q.startswith("PUT /lfs-upload/") for q in server.requests)
    meta, body = _card(out / "README.md")
    assert "AutoModelForCausalLM.from_pretrained('alice/stories260k')" in body
    # again, to a branch of the now existing repository
    r = run_cli("export", "--format", "hf", "--checkpoint", s260, "--out", out, "--force", "--push-to-hub",
                "alice/stories260k", "--revision", "v2", env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert sorted(repo["branches"]) == ["main", "v2"] and repo["branches"]["v2"]["config.json"] == files["config.json"]


@pytest.mark.slow
def test_push_gguf_to_the_hub(s260, hub, tmp_path):
    pytest.importorskip("gguf", reason="needs gguf: pip install 'tinystories[gguf]'")
    server, env = hub
    out = tmp_path / "stories260K.gguf"
    r = run_cli("export", "--format", "gguf", "--checkpoint", s260, "--out", out, "--push-to-hub", "alice/s260-gguf",
                env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    files = server.repos["alice/s260-gguf"]["branches"]["main"]
    assert sorted(files) == ["README.md", "stories260K.Modelfile", "stories260K.gguf"]
    assert files["stories260K.gguf"] == out.read_bytes()
    meta = yaml.safe_load(files["README.md"].decode().split("---\n")[1])
    assert meta["library_name"] == "gguf" and "gguf" in meta["tags"]
    assert "llama-cli -hf alice/s260-gguf" in files["README.md"].decode()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stories260K.Modelfile", "stories260K.gguf"]  # no stage


@pytest.mark.slow
def test_push_errors_are_one_line(s260, hub, tmp_path):
    server, env = hub
    base = ["export", "--format", "hf", "--checkpoint", s260]
    # unauthenticated: no token at all (checked before any request), or a token the Hub rejects
    no_token = {k: v for k, v in env.items() if k != "HF_TOKEN"}
    line = one_line_error(run_cli(*base, "--out", tmp_path / "a", "--push-to-hub", "alice/x",
                                  env={**no_token, "HF_TOKEN": ""}), "unauthenticated", "HF_TOKEN")
    assert "alice/x" in line
    one_line_error(run_cli(*base, "--out", tmp_path / "b", "--push-to-hub", "alice/x",
                           env={**env, "HF_TOKEN": "hf_bogus"}), "unauthenticated", "401")
    # forbidden: a read-only token, and someone else's namespace
    one_line_error(run_cli(*base, "--out", tmp_path / "c", "--push-to-hub", "alice/x", env={**env, "HF_TOKEN": READER}),
                   "forbidden", "403")
    one_line_error(run_cli(*base, "--out", tmp_path / "d", "--push-to-hub", "bob/x", env=env), "forbidden", "bob/x")
    assert server.repos == {}  # nothing created, nothing uploaded
    # offline: nothing listens there, or HF_HUB_OFFLINE=1
    one_line_error(run_cli(*base, "--out", tmp_path / "e", "--push-to-hub", "alice/x", env={**env, "HF_ENDPOINT": "http://127.0.0.1:9"}),
                   "offline", "127.0.0.1:9")
    assert (tmp_path / "e" / "README.md").is_file()  # the export itself is complete; only the push failed
    one_line_error(run_cli(*base, "--out", tmp_path / "f", "--push-to-hub", "alice/x",
                           env={**env, "HF_HUB_OFFLINE": "1"}), "offline", "HF_HUB_OFFLINE")
    assert not (tmp_path / "a").exists() and not (tmp_path / "f").exists()  # known before any work: nothing written
    # flags: a bad repo id or a stray --private fail before any work
    one_line_error(run_cli(*base, "--out", tmp_path / "g", "--push-to-hub", "no-owner", env=env), "OWNER/NAME")
    one_line_error(run_cli(*base, "--out", tmp_path / "g", "--private", env=env), "--private", "--push-to-hub")
    one_line_error(run_cli("export", "--format", "llama2c", "--checkpoint", s260, "--out", tmp_path / "m.bin",
                           "--push-to-hub", "alice/x", env=env), "--push-to-hub", "hf and gguf")
    assert not (tmp_path / "g").exists() and not (tmp_path / "m.bin").exists()


def _run_around(checkpoint: Path, root: Path, metrics: str) -> Path:
    """A run directory holding a copy of `checkpoint` as its step-10 checkpoint, with this metrics.jsonl text."""
    import os
    import shutil

    ckdir = root / "run" / "checkpoints"
    shutil.copytree(checkpoint, ckdir / "step-00000010")
    os.symlink("step-00000010", ckdir / "latest")
    (root / "run" / "metrics.jsonl").write_text(metrics)
    return root / "run"


_POINTS = "".join(json.dumps({"kind": "train", "step": s, "loss": 8.0 - s / 10, "lr": 1e-3, "time": 1.5 * s}) + "\n"
                  for s in range(1, 11))


def test_training_time_of_a_live_run_skips_a_half_written_last_line(random_checkpoint, tmp_path):
    from tinystories.export.hub import training_time_s

    run = _run_around(random_checkpoint, tmp_path, _POINTS + '{"kind": "train", "step": 11, "time": 1')
    assert training_time_s(run / "checkpoints" / "step-00000010", 10) == 15.0


def test_model_card_corrupt_metrics_line_is_one_line_naming_file_and_line(random_checkpoint, tmp_path):
    lines = _POINTS.splitlines(keepends=True)
    run = _run_around(random_checkpoint, tmp_path, "".join(lines[:6]) + '{"kind": "train", "ti\n' + "".join(lines[6:]))
    out = tmp_path / "hf"
    one_line_error(run_cli("export", "--format", "hf", "--checkpoint", run, "--out", out),
                   f"{run / 'metrics.jsonl'}:7", "corrupt")
    assert not out.exists()
