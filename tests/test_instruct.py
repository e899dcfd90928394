"""Stories on request: the official shards' requests, the derivation for plain text, the rendering, the cache,
`generate --words/--features`, the API and the playground, `eval --instruct`, and every error as one line."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest
import torch

from conftest import DATA_DIR, TRAIN_HEAD, VALID_HEAD, one_line_error, run_cli

FEATURES = ["Dialogue", "Twist", "BadEnding", "MoralValue"]


def head_stories(n: int) -> list[str]:
    from tinystories.data.text import iter_documents

    return list(iter_documents([TRAIN_HEAD], n))


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """A directory of JSON shards in the official TinyStories_all_data layout: 60 real stories from the train head
    with requests attached (words given, features from a fixed rotation, the first sentence as the summary)."""
    out = tmp_path_factory.mktemp("shards") / "TinyStories_all_data"
    out.mkdir()
    for k in range(2):
        records = []
        for i, story in enumerate(head_stories(60)[k * 30:(k + 1) * 30]):
            words = ["shard", f"word{k}", f"thing{i}"]
            feats = [FEATURES[i % 4]] if i % 3 else []
            records.append({"story": story, "instruction": {
                "prompt": f"Write a short story using the words {', '.join(words)}.", "words": words,
                "features": feats}, "summary": story.split(".")[0] + ".", "source": "GPT-4"})
        (out / f"data{k:02d}.json").write_text(json.dumps(records), encoding="utf-8")
    return out


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tok4k) -> dict[str, Path]:
    """Tiny random models with the real 4K tokenizer, one per text format (the format recorded in config.yaml)."""
    import torch

    from tinystories.core.config import RunConfig
    from tinystories.data.tokenizer import load_tokenizer
    from tinystories.model.checkpoint import write_checkpoint_dir
    from tinystories.model.transformer import Transformer

    tok = load_tokenizer(tok4k)
    out = {}
    for fmt in ("plain", "instruct"):
        cfg = RunConfig.model_validate({"model": {"vocab_size": tok.vocab_size, "dim": 64, "n_layers": 2,
                                                  "n_heads": 4, "max_seq_len": 256}, "data": {"format": fmt}})
        torch.manual_seed(0)
        out[fmt] = tmp_path_factory.mktemp("ck") / fmt
        write_checkpoint_dir(out[fmt], Transformer(cfg.model), cfg, tok, {"step": 7})
    return out


# ------------------------------------------------------------------------------------------------ data


def test_official_shards_are_rendered_with_their_own_requests(shards):
    from tinystories.data.requests import parse_rendered
    from tinystories.data.text import unit_documents, unit_records

    path = shards / "data00.json"
    records = unit_records(path)
    assert records[4][1]["instruction"]["words"] == ["shard", "word0", "thing4"]
    assert unit_documents(path) == [s for s, _ in records]  # plain: the stories alone
    rendered = unit_documents(path, fmt="instruct")
    asked = [(parse_rendered(r), s, obj) for r, (s, obj) in zip(rendered, records)]
    with_request = [(req, story, obj) for (req, story), _, obj in asked if req]
    assert 0.6 * len(records) <= len(with_request) < len(records)  # some stay plain
    for req, story, obj in with_request:
        assert story == next(s for s, o in records if o is obj)
        assert req.words in ((), tuple(obj["instruction"]["words"]))  # the shard's words, never derived ones
        assert set(req.features) <= set(obj["instruction"]["features"])
        assert req.summary in ("", obj["summary"])
    assert any(req.summary for req, _, _ in with_request) and any(req.features for req, _, _ in with_request)


def test_derivation_is_deterministic_and_only_claims_what_it_sees():
    from tinystories.data.requests import ADJECTIVES, contains_word, derive_request, has_dialogue

    stories = head_stories(200)
    first = [derive_request(s) for s in stories]
    assert first == [derive_request(s) for s in stories]
    assert sum(len(r.words) == 3 for r in first) >= 195
    for story, req in zip(stories, first):
        assert all(contains_word(story, w) for w in req.words), (req, story[:200])
        assert req.features == (("Dialogue",) if has_dialogue(story) else ())
        assert req.summary == ""
    adjectives = [r.words[2] for r in first if len(r.words) == 3]
    assert sum(a in ADJECTIVES or a.endswith(("ful", "ous", "ive", "less", "able", "ish")) for a in adjectives) \
        >= 0.9 * len(adjectives)
    lily = derive_request('Lily jumped over the big red ball. "Wow!" said Lily. She liked to jump.')
    assert lily.words[0] == "jump" and lily.words[1] == "ball" and lily.words[2] in ("big", "red")
    assert "lily" not in lily.words and lily.features == ("Dialogue",)


def test_rendering_round_trips_and_keeps_a_share_plain():
    from tinystories.data.requests import Request, parse_rendered, render, request_lines

    req = Request(("hang", "foot", "cute"), ("Dialogue", "Twist"), "A girl hangs a cute sock on her foot.")
    story = "Once upon a time, Sue had a cute sock.\n\nShe hung it up."
    text = request_lines(req) + story
    assert text.startswith("Words: hang, foot, cute\nFeatures: Dialogue, Twist\nSummary: A girl hangs a cute sock on "
                           "her foot.\nStory: Once upon a time")
    assert parse_rendered(text) == (req, story)
    assert parse_rendered(story) == (Request(), story)
    stories = head_stories(400)
    rendered = [render(s, None) for s in stories]
    assert rendered == [render(s, None) for s in stories]
    assert [parse_rendered(r)[1] for r in rendered] == stories
    plain = sum(r == s for r, s in zip(rendered, stories)) / len(stories)
    assert 0.1 < plain < 0.3


def test_inflections_count():
    from tinystories.data.requests import contains_word

    for word, text in [("hang", "He hung it."), ("hang", "Hanging there."), ("foot", "My feet hurt."),
                       ("cute", "the cutest cat"), ("stop", "It stopped."), ("cry", "She cried."),
                       ("run", "They ran home.")]:
        assert contains_word(text, word), (word, text)
    assert not contains_word("The hangar was big.", "hang")


def test_prepare_format_changes_the_cache(tmp_path, tok4k, shards):
    from tinystories.data.cache import TokenCache
    from tinystories.data.tokenizer import load_tokenizer

    dirs = {}
    for fmt in ("plain", "instruct"):
        r = run_cli("data", "prepare", "--tokenizer", tok4k, "--from", shards, "--data-dir", tmp_path,
                    "--format", fmt, "--workers", "1")
        assert r.returncode == 0, r.stderr
        done = next(line for line in r.stdout.splitlines() if line.startswith(("built in", "cache hit")))
        dirs[fmt] = Path(done.split(": ", 1)[1].split()[0])
    assert dirs["plain"] != dirs["instruct"]
    tok = load_tokenizer(tok4k)
    cache = TokenCache.open(dirs["instruct"])
    assert cache.manifest["text_format"] == "instruct"
    text = tok.decode([int(t) for t in cache.split("train").stream()[:20000]])
    assert "Words: shard, word" in text and "\nStory: " in text


def test_story_only_loss_masks_exactly_the_request_lines(tmp_path, tok4k, shards):
    """train.loss_on=story: on a real instruct cache, the unscored tokens of every document decode to its request
    lines (through `Story:`), the rest to its story; a window judged with its lookback agrees with the whole
    stream, and the sampler's targets are -1 exactly there."""
    import numpy as np

    from tinystories.data.cache import TokenCache
    from tinystories.data.requests import RequestTokens
    from tinystories.data.tokenizer import load_tokenizer
    from tinystories.training.batches import WindowSampler

    r = run_cli("data", "prepare", "--tokenizer", tok4k, "--from", shards, "--data-dir", tmp_path,
                "--format", "instruct", "--workers", "1")
    assert r.returncode == 0, r.stderr
    done = next(line for line in r.stdout.splitlines() if line.startswith(("built in", "cache hit")))
    cache = TokenCache.open(Path(done.split(": ", 1)[1].split()[0]))
    tok = load_tokenizer(tok4k)
    unscored = RequestTokens(tok)
    ids = np.asarray(cache.split("train").stream()[:], dtype=np.int64)
    mask = unscored(ids)
    starts = list(np.flatnonzero(ids == tok.doc_start_id)) + [len(ids)]
    asked = 0
    for a, b in zip(starts, starts[1:]):
        doc, m = ids[a + 1 : b], mask[a + 1 : b]
        assert not mask[a] and (np.diff(m.astype(int)) <= 0).all()  # the request, then the story; its start scored
        head, story = tok.decode(doc[m].tolist()), tok.decode(doc[~m].tolist())
        if m.any():
            asked += 1
            assert head.startswith(("Words: ", "Features: ", "Summary: ", "Story:")) and head.endswith("\nStory:")
            assert story.startswith(" ") and "Story:" not in story
        else:
            assert "\nStory:" not in story
    assert 0.6 < asked / (len(starts) - 1) < 0.95  # a share of the stories stays plain
    rng = np.random.default_rng(0)
    for o in rng.integers(1, len(ids) - 300, 50):
        lo = max(0, o - unscored.LOOKBACK)
        assert (unscored(ids[lo : o + 257 + unscored.lookahead])[o - lo : o - lo + 257] == mask[o : o + 257]).all()
    sampler = WindowSampler(cache, 256, 8, seed=3, rank=0, device=torch.device("cpu"), unscored=unscored)
    plain = WindowSampler(cache, 256, 8, seed=3, rank=0, device=torch.device("cpu"))
    (x, y, w), (x0, y0, w0) = sampler.get(5, 0), plain.get(5, 0)
    assert torch.equal(x, x0) and ((y == -1) | (y == y0)).all() and 0 < int((y == -1).sum()) < y.numel() // 2
    assert w is None and w0 is None  # no weights unless train.request_word_weight asks for them

    # train.request_word_weight: the story tokens that first write a token of the request's `Words:` line
    first = unscored.requested_words(ids)
    head = len(tok.encode("Words:"))
    flagged_docs = 0
    for a, b in zip(starts, starts[1:]):
        doc, m, f = ids[a + 1 : b], mask[a + 1 : b], first[a + 1 : b]
        request = doc[m]
        if not tok.decode(request.tolist()).startswith("Words: "):
            assert not f.any()
            continue
        line = request[head : next(i for i, t in enumerate(request) if "\n" in tok.decode([int(t)]))]
        spelled = {int(t) for t in line if any(c.isalpha() for c in tok.decode([int(t)]))}
        story_pos = np.flatnonzero(~m)
        assert not (f & m).any() and set(doc[f].tolist()) == spelled & set(doc[story_pos].tolist())
        for p in np.flatnonzero(f):  # each at its first place in the story
            assert int(doc[p]) not in doc[story_pos[story_pos < p]]
        flagged_docs += bool(f.any())
    assert flagged_docs >= 5  # the fixture asks for made-up words (shard, word0, thing7): where stories spell a piece
    weighted = WindowSampler(cache, 256, 8, seed=3, rank=0, device=torch.device("cpu"), unscored=unscored,
                             word_weight=4.0)
    xw, yw, ww = weighted.get(5, 0)
    assert torch.equal(xw, x) and torch.equal(yw, y) and set(ww.unique().tolist()) <= {1.0, 4.0}
    assert 0 < int((ww == 4.0).sum()) < 8 * 20 and not ((ww == 4.0) & (yw == -1)).any()


def test_instruct_training_scores_the_stories_only_by_default(tmp_path, tok4k, shards):
    from conftest import REPO

    def train(*extra):
        out = tmp_path / f"run{len(extra)}"
        sets = ["model.dim=32", "model.n_layers=1", "model.n_heads=2", "model.max_seq_len=128", "train.batch_size=4",
                "train.max_steps=3", "train.max_minutes=null", "train.eval_interval=3", "train.eval_tokens=512",
                "train.compile=false", "train.dtype=float32", "train.sample_tokens=4", "data.format=instruct",
                f"tokenizer.path={tok4k}", f"data.data_dir={tmp_path / 'data'}", *extra]
        r = run_cli("train", "--config", REPO / "configs" / "cpu.yaml", "--out", out, "--data", shards,
                    *[a for s in sets for a in ("--set", s)], timeout=600)
        assert r.returncode == 0, r.stderr[-2000:]
        return r.stdout + r.stderr, (out / "config.yaml").read_text()

    log, config = train()
    assert "loss: on the stories only" in log and "loss_on: story" in config
    assert "loss: x5 where a story first writes a requested word (train.request_word_weight)" in log
    log, config = train("train.loss_on=all")
    assert "loss: on the stories only" not in log and "loss_on: all" in config
    log, config = train("train.request_word_weight=1", "train.seed=2")
    assert "loss: on the stories only" in log and "requested word" not in log and "request_word_weight: 1.0" in config


def test_unpacking_the_instruct_archive_resumes(tmp_path, shards):
    from tinystories.data.text import HUB_FILES, SHARDS_DIR, _unpack_shards, list_text_files

    raw = tmp_path / "raw"
    raw.mkdir()
    with tarfile.open(raw / HUB_FILES["instruct"][0], "w:gz") as tar:
        for f in sorted(shards.iterdir()):
            tar.add(f, arcname=f.name)
    (raw / SHARDS_DIR).mkdir()
    (raw / SHARDS_DIR / "data00.json").write_bytes((shards / "data00.json").read_bytes())  # one already there
    _unpack_shards(raw, log=lambda *_: None)
    assert [f.name for f in list_text_files(raw)] == ["data00.json", "data01.json"]
    assert (raw / SHARDS_DIR / "data01.json").read_bytes() == (shards / "data01.json").read_bytes()
    assert not (raw / HUB_FILES["instruct"][0]).exists()


# ------------------------------------------------------------------------------------------------ asking


def test_generate_with_a_request(checkpoints):
    r = run_cli("generate", "--checkpoint", checkpoints["instruct"], "--words", "dragon,cookie,brave",
                "--features", "dialogue", "--summary", "A brave dragon bakes.", "--prompt", "",
                "--max-new-tokens", "120", "--word-bias", "30")
    assert r.returncode == 0, r.stderr
    assert "[the best of 8 stories" in r.stderr  # data/requests.CANDIDATES, drawn together
    assert r.stdout.startswith("Words: dragon, cookie, brave\nFeatures: Dialogue\nSummary: A brave dragon bakes."
                               "\nStory: ")
    from tinystories.data.requests import parse_rendered

    story = parse_rendered(r.stdout)[1].lower()
    # the bias writes them where the (random) model ranks them among its 200 likeliest tokens
    assert all(w in story for w in ("dragon", "cookie", "brave")), story
    r = run_cli("generate", "--checkpoint", checkpoints["instruct"], "--words", "dragon,cookie", "--prompt", "Once",
                "--num-samples", "2", "--max-new-tokens", "8")
    assert r.returncode == 0 and r.stdout.count("Words: dragon, cookie\nStory: Once") == 2, r.stdout


@pytest.mark.parametrize("args, needles", [
    (["--words", "dragon"], ["trained on plain stories", "quickstart --instruct"]),
    (["--features", "dialogue"], ["trained on plain stories"]),
])
def test_plain_model_refuses_a_request(checkpoints, args, needles):
    one_line_error(run_cli("generate", "--checkpoint", checkpoints["plain"], "--prompt", "x", *args), *needles)


def test_unknown_feature_and_too_many_words_are_one_line(checkpoints):
    one_line_error(run_cli("generate", "--checkpoint", checkpoints["instruct"], "--prompt", "x", "--features",
                           "dialogue,singing"), "unknown feature 'singing'", "dialogue, badending, moralvalue, twist")
    one_line_error(run_cli("generate", "--checkpoint", checkpoints["instruct"], "--prompt", "x", "--words",
                           "a,b,c,d"), "at most three words")


def test_word_bias_fades_once_a_word_is_written(tok4k):
    from tinystories.data.tokenizer import load_tokenizer
    from tinystories.inference.sampling import WordBias

    tok = load_tokenizer(tok4k)
    wb = WordBias(tok, ["dragon", "cookie"], strength=3.0, ramp=0)
    dragon = tok.encode(" dragon")
    assert wb.bias(torch.zeros(tok.vocab_size))[dragon[0]] == 3.0
    for t in tok.encode(" The dragon"):
        wb.push(t)
    left = wb.bias(torch.zeros(tok.vocab_size))
    assert dragon[0] not in left and tok.encode(" cookie")[0] in left
    for t in tok.encode(" ate cookies."):
        wb.push(t)
    assert not wb and wb.bias(torch.zeros(tok.vocab_size)) == {}


def test_dialogue_bias_opens_a_quote_then_fades(tok4k):
    from tinystories.data.tokenizer import load_tokenizer
    from tinystories.inference.sampling import WordBias

    tok = load_tokenizer(tok4k)
    quotes = {tok.encode(' "')[0], tok.encode('"')[0]}
    assert not WordBias(tok, [], strength=3.0, ramp=0)  # no words, no dialogue: nothing to steer
    wb = WordBias(tok, [], strength=3.0, ramp=0, dialogue=True)
    assert wb and all(wb.bias(torch.zeros(tok.vocab_size))[q] == 3.0 for q in quotes)
    for t in tok.encode(" Lily said hello."):
        wb.push(t)
    assert set(wb.bias(torch.zeros(tok.vocab_size))) == quotes  # no quotation yet: still pushed
    for t in tok.encode(' She said, "Hi!"'):
        wb.push(t)
    assert not wb and wb.bias(torch.zeros(tok.vocab_size)) == {}


def test_eval_instruct_reports_every_figure(checkpoints, tmp_path):
    out = tmp_path / "instruct.json"
    r = run_cli("eval", "--checkpoint", checkpoints["instruct"], "--instruct", "--text", VALID_HEAD,
                "--num-stories", "4", "--max-new-tokens", "24", "--max-tokens", "2048", "--device", "cpu",
                "--plain-checkpoint", checkpoints["plain"], "--no-grammar", "--json", out, timeout=900)
    assert r.returncode == 0, r.stderr
    for label in ("requested words present", "stories with all three", "dialogue, asked", "bits per byte"):
        assert label in r.stdout
    rep = json.loads(out.read_text())
    assert set(rep["conditions"]) == {"request", "request, one story", "request, no bias", "no request",
                                      "plain model, no request"}
    assert len(rep["requests"]) == 4 and all(len(q["words"]) == 3 for q in rep["requests"])
    assert rep["conditions"]["request"]["words_present"] > rep["conditions"]["no request"]["words_present"]
    one_line_error(run_cli("eval", "--checkpoint", checkpoints["plain"], "--instruct", "--text", VALID_HEAD),
                   "trained on plain stories")


# ------------------------------------------------------------------------------------------------ serving


@pytest.fixture(scope="module")
def servers(checkpoints):
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    from test_serve import Server

    started = {fmt: Server(ck, "--no-compile") for fmt, ck in checkpoints.items()}
    try:
        yield {fmt: s.wait() for fmt, s in started.items()}
    finally:
        for s in started.values():
            s.stop()


def test_api_takes_a_request(servers):
    import httpx

    url = servers["instruct"].url
    assert httpx.get(url + "/v1/model", timeout=300).json()["text_format"] == "instruct"
    body = {"prompt": "", "words": ["dragon", "cookie", "brave"], "features": ["Dialogue"], "max_new_tokens": 24,
            "seed": 3, "word_bias": 20}
    r = httpx.post(url + "/v1/generate", json=body, timeout=300)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["prompt"] == "Words: dragon, cookie, brave\nFeatures: Dialogue\nStory: "
    assert all(w in out["text"].lower() for w in body["words"]), out["text"]  # the bias (a random model)
    r = httpx.post(url + "/v1/completions", json={"prompt": "Once", "max_tokens": 24, "seed": 3, "words": ["dragon"],
                                                 "summary": "A dragon.", "word_bias": 20}, timeout=300)
    assert r.status_code == 200, r.text
    assert "dragon" in r.json()["choices"][0]["text"].lower()
    with httpx.stream("POST", url + "/v1/generate", json=body | {"stream": True}, timeout=300) as s:
        first = next(line for line in s.iter_lines() if line.startswith("data:"))
    assert json.loads(first[5:])["prompt"].startswith("Words: dragon")


def test_api_best_of_candidates(servers):
    import httpx

    url = servers["instruct"].url
    body = {"prompt": "", "words": ["dragon", "cookie", "brave"], "max_new_tokens": 24, "seed": 5, "word_bias": 20,
            "candidates": 4}
    answers = [httpx.post(url + "/v1/generate", json=body, timeout=300) for _ in range(2)]
    assert all(r.status_code == 200 for r in answers), answers[0].text
    out = answers[0].json()
    assert out["candidates"] == 4 and out == answers[1].json() | {"timing": out["timing"]}  # seeded: the same pick
    # a random model: the bias pushes a word only where the model ranks it plausible (best-of-N's rank rule)
    assert any(w in out["text"].lower() for w in body["words"]), out["text"]
    r = httpx.post(url + "/v1/generate", json=body | {"stream": True}, timeout=300)
    assert r.status_code == 422 and "candidates > 1 needs stream: false" in r.text
    plain = httpx.post(url + "/v1/generate", json={"prompt": "Once", "max_new_tokens": 8, "candidates": 4},
                       timeout=300)
    assert plain.status_code == 200 and plain.json()["candidates"] == 1  # nothing asked: nothing to choose by


@pytest.mark.parametrize("fmt, body, needle", [
    ("plain", {"words": ["dragon"]}, "trained on plain stories"),
    ("instruct", {"features": ["singing"]}, "unknown feature 'singing' (known: dialogue"),
    ("instruct", {"words": ["a", "b", "c", "d"]}, "at most 3"),
])
def test_api_request_errors(servers, fmt, body, needle):
    import httpx

    for path in ("/v1/generate", "/v1/completions"):
        r = httpx.post(servers[fmt].url + path, json={"prompt": "x"} | body, timeout=300)
        assert r.status_code == 422, r.text
        msg = " ".join(d["msg"] for d in r.json()["detail"])
        assert needle in msg and "\n" not in msg, msg


def test_playground_asks_for_a_story(servers):
    from pathlib import Path as _P

    if not _P("/usr/bin/chromium").exists():
        pytest.skip("/usr/bin/chromium not installed")
    sync_api = pytest.importorskip("playwright.sync_api")
    from test_browser import ARGS, CHROMIUM

    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            page = browser.new_page()
            page.goto(servers["plain"].url + "/")
            page.wait_for_function("document.getElementById('model-info').textContent.includes('parameters')")
            assert page.locator("#request").is_hidden()  # a plain model: no request box
            page.goto(servers["instruct"].url + "/")
            page.wait_for_function("document.getElementById('model-info').textContent.includes('parameters')")
            page.wait_for_selector("#request", state="visible")
            page.fill("#prompt", "")
            page.fill("#word1", "dragon")
            page.fill("#word2", "cookie")
            page.check("#feature-dialogue")
            page.eval_on_selector("#max_new_tokens", "el => { el.value = 16; el.dispatchEvent(new Event('input')); }")
            page.click("#generate")
            page.wait_for_function("document.getElementById('stat-finish').textContent !== ''", timeout=120_000)
            assert page.inner_text("#output .prompt").startswith("Words: dragon, cookie\nFeatures: Dialogue\nStory:")
            assert page.locator("#output .tok").count() > 0
        finally:
            browser.close()


def test_quickstart_instruct_does_not_reuse_a_plain_run(tmp_path):
    from test_quickstart import _fake_run

    out = tmp_path / "qs"
    _fake_run(out)
    one_line_error(run_cli("quickstart", "--out", out, "--data-dir", tmp_path / "data", "--data", DATA_DIR,
                           "--minutes", "1", "--instruct"), "format plain (now instruct)", f"--out {out}-instruct")
    assert not (tmp_path / "data").exists()


def test_word_bias_waits_until_the_word_is_plausible(tok4k):
    import torch

    from tinystories.data.tokenizer import load_tokenizer
    from tinystories.inference.sampling import WordBias

    tok = load_tokenizer(tok4k)
    dragon = tok.encode(" dragon")[0]
    wb = WordBias(tok, ["dragon"], strength=3.0, ramp=0, plausible=10)
    logits = torch.arange(tok.vocab_size, dtype=torch.float32)  # token i has logit i
    logits[dragon] = -1.0  # the least likely token: not pushed
    assert dragon not in wb.bias(logits)
    logits[dragon] = float(tok.vocab_size)  # the likeliest: pushed
    assert wb.bias(logits)[dragon] == 3.0
    wb.push(tok.encode(" the")[0])  # not the pushed token: nothing written by the bias
    wb.bias(logits)
    wb.push(dragon)
    assert wb.pushed == [1]  # the position the bias wrote


def test_pick_candidate_prefers_what_was_asked_then_likelihood():
    from tinystories.data.requests import Request
    from tinystories.inference.sampling import naturalness, pick_candidate

    req = Request(words=("dragon", "cookie", "brave"), features=("Dialogue",))
    head = "Words: dragon, cookie, brave\nFeatures: Dialogue\nStory: "

    def story(text, logprob):
        return {"text": head + text, "tokens": 10, "ended": True, "logprob": logprob}

    one_word = story("The dragon slept.", -0.5)
    all_asked = story('The brave dragon ate a cookies. "Yum!" he said.', -3.0)
    all_asked_likelier = story('A brave dragon baked cookies. "Hi," she said.', -2.0)
    best = pick_candidate([one_word, all_asked, all_asked_likelier], req)
    assert best["text"] == all_asked_likelier["text"] and "logprob" not in best
    # per token, and the tokens the bias wrote count once more: a forced word that did not fit costs
    assert naturalness([-1.0, -1.0, -1.0, -1.0], []) == -1.0
    assert naturalness([-1.0, -1.0, -5.0, -1.0], [2]) < naturalness([-1.0, -1.0, -5.0, -1.0], [])
    assert naturalness([-1.0] * 20, []) == naturalness([-1.0] * 5, [])


def test_the_choice_weighs_where_the_bias_wrote_even_once_it_is_done(checkpoints, monkeypatch):
    """A WordBias with every word written is falsy (nothing left to push) but still knows where it wrote: the
    choice among candidates must see those positions."""
    from tinystories.data.requests import Request
    from tinystories.inference import sampling
    from tinystories.model.checkpoint import load_model

    model, ck = load_model(checkpoints["instruct"], "cpu")
    seen = []
    real = sampling.naturalness
    monkeypatch.setattr(sampling, "naturalness", lambda lp, pushed: seen.append(list(pushed)) or real(lp, pushed))
    req = Request(words=("the",))
    sampling.generate_texts(model, ck.tokenizer, "Words: the\nStory: ", sampling.SamplingParams(max_new_tokens=40,
                            seed=0), 1, req, 20.0, candidates=2)
    assert len(seen) == 2 and any(seen), seen


def test_naturalness_weighs_the_tokens_after_a_pushed_word(monkeypatch):
    from tinystories.data import requests
    from tinystories.inference.sampling import naturalness

    lp = [-1.0, -1.0, -5.0, -3.0, -1.0, -1.0]  # a word pushed at 2 that the next token struggles to follow
    monkeypatch.setattr(requests, "AFTER_PUSH", 0)
    assert naturalness(lp, [2]) == -2.0 - 5.0
    monkeypatch.setattr(requests, "AFTER_PUSH", -1)  # the mean alone
    assert naturalness(lp, [2]) == -2.0
    monkeypatch.setattr(requests, "AFTER_PUSH", 2)
    assert naturalness(lp, [2]) == -2.0 - 3.0
    assert naturalness(lp, [2, 3]) == -2.0 - 2.5  # overlapping stretches count each token once
    assert naturalness(lp, [5]) == -2.0 - 1.0  # the story's end cuts the stretch
