"""Tokenizer training, loading and report; the fingerprinted token cache."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import DATA_DIR, LLAMA2_TOKENIZER, TOK512, TRAIN_HEAD, VALID_HEAD, one_line_error, run_cli
from tinystories.core.errors import UserError
from tinystories.data.cache import TokenCache, prepare
from tinystories.data.text import iter_documents
from tinystories.data.tokenizer import load_tokenizer, report, train_bpe


def test_bpe_roundtrip_and_articles_are_single_tokens(tok4k):
    tok = load_tokenizer(tok4k)
    assert tok.vocab_size == 4096
    story = next(iter_documents([TRAIN_HEAD]))
    ids = tok.encode(story)
    assert tok.decode(ids) == story  # byte-level BPE is lossless
    for word in ("a", "the", "an"):
        assert tok.piece_id(word, leading_space=True) is not None
    assert tok.doc_start_id == tok.tok.token_to_id("<|endoftext|>")
    assert tok.decode(tok.encode("a <|endoftext|> b")) == "a <|endoftext|> b"  # text that spells it stays text


def test_transformers_fast_tokenizer_encodes_identically(tok4k):
    transformers = pytest.importorskip("transformers")
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tok4k / "tokenizer.json"))
    tok = load_tokenizer(tok4k)
    docs = list(iter_documents([TRAIN_HEAD], max_docs=50))
    for d in docs:
        assert hf.encode(d, add_special_tokens=False) == tok.encode(d)


def test_sentencepiece_models_load():
    llama = load_tokenizer(LLAMA2_TOKENIZER)
    assert (llama.kind, llama.vocab_size, llama.doc_start_id) == ("sentencepiece", 32000, 1)
    small = load_tokenizer(TOK512)
    assert small.vocab_size == 512 and small.stop_ids == {1, 2}
    assert small.decode(small.encode("Once upon a time")) == "Once upon a time"


def test_report_shows_article_starvation_of_32k_vocab(tok4k):
    docs = VALID_HEAD.read_text().splitlines()[:500]
    custom, llama = report(load_tokenizer(tok4k), docs), report(load_tokenizer(LLAMA2_TOKENIZER), docs)
    the = {r["kind"]: next(a for a in r["articles"] if a["text"] == " the") for r in (custom, llama)}
    assert the["bpe"]["single_token"] and the["sentencepiece"]["single_token"]
    assert 0.01 < the["bpe"]["share"] < 0.1
    # the 32K vocabulary leaves most of its entries unused on TinyStories text; the 4K one uses most of its
    assert llama["unused_vocab_share"] > 0.8 > custom["unused_vocab_share"]
    assert custom["bytes_per_token"] > 3.0


def test_tokenizer_train_keeps_an_existing_tokenizer_without_force(tmp_path):
    base = ("tokenizer", "train", "--from", TRAIN_HEAD, "--max-stories", "300", "--out", tmp_path / "t")
    assert run_cli(*base, "--vocab-size", "400").returncode == 0
    before = (tmp_path / "t" / "tokenizer.json").read_bytes()
    one_line_error(run_cli(*base, "--vocab-size", "300"), "tokenizer.json already exists", "--force")
    assert (tmp_path / "t" / "tokenizer.json").read_bytes() == before
    r = run_cli(*base, "--vocab-size", "300", "--force")
    assert r.returncode == 0 and load_tokenizer(tmp_path / "t").vocab_size == 300


def test_vocab_below_byte_alphabet_is_rejected(tmp_path):
    r = run_cli("tokenizer", "train", "--vocab-size", "200", "--from", TRAIN_HEAD, "--out", tmp_path / "t")
    assert r.returncode == 2 and "256" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("stories", ["0", "-5"])
def test_report_rejects_non_positive_story_count(tok4k, stories):
    r = run_cli("tokenizer", "report", "--tokenizer", tok4k, "--from", TRAIN_HEAD, "--stories", stories)
    one_line_error(r, f"--stories {stories}", ">= 1")


def test_tokenizer_train_rejects_non_positive_max_stories(tmp_path):
    r = run_cli("tokenizer", "train", "--from", TRAIN_HEAD, "--max-stories", "0", "--out", tmp_path / "t")
    one_line_error(r, "--max-stories 0", ">= 1")
    assert not (tmp_path / "t").exists()


def test_not_a_tokenizer_file(tmp_path):
    bad = tmp_path / "tokenizer.json"
    bad.write_text('{"hello": 1}')
    with pytest.raises(UserError, match="not a valid tokenizer.json"):
        load_tokenizer(bad)
    garbage = tmp_path / "x.model"
    garbage.write_bytes(b"\x00\x01garbage")
    with pytest.raises(UserError, match="not a valid SentencePiece model"):
        load_tokenizer(garbage)
    r = run_cli("data", "prepare", "--tokenizer", bad, "--from", TRAIN_HEAD, "--data-dir", tmp_path / "d")
    assert r.returncode == 2 and "tokenizer.json" in r.stderr


def test_unwritable_output_dir(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    r = run_cli("tokenizer", "train", "--from", TRAIN_HEAD, "--out", blocker / "tok")
    assert r.returncode == 2 and "a-file/tok" in r.stderr and "Traceback" not in r.stderr
    assert blocker.read_text() == "not a directory"
    r = run_cli("data", "prepare", "--tokenizer", LLAMA2_TOKENIZER, "--from", TRAIN_HEAD, "--cache-dir", blocker / "c")
    assert r.returncode == 2 and "cannot create" in r.stderr and "Traceback" not in r.stderr


def test_cache_contents_fingerprint_and_hit(tmp_path, tok4k):
    tok = load_tokenizer(tok4k)
    path, hit = prepare(tok, DATA_DIR, tmp_path / "cache")
    assert not hit
    cache = TokenCache.open(path)
    m = cache.manifest
    assert m["tokenizer"]["sha256"] == tok.sha256 and m["dtype"] == "uint16"
    train = cache.split("train")
    assert m["splits"]["train"]["documents"] == 2316 == len(train.docs)
    assert train.bytes == sum(len(d.encode()) for d in iter_documents([TRAIN_HEAD]))
    stream = train.stream()
    # one start-of-story token per story, no padding: token count = story tokens + stories
    assert int((stream == tok.doc_start_id).sum()) == 2316
    first = stream[train.docs[0, 0] + 1 : train.docs[1, 0]]
    assert tok.decode(first.tolist()) == next(iter_documents([TRAIN_HEAD]))
    assert cache.split("val").tokens > 0  # the official validation file went to val
    # a second prepare with the same inputs is a cache hit; another tokenizer gives another cache
    path2, hit2 = prepare(tok, DATA_DIR, tmp_path / "cache")
    assert hit2 and path2 == path
    other = tmp_path / "tok300"
    train_bpe(iter_documents([TRAIN_HEAD], max_docs=200), 300, other)
    path3, hit3 = prepare(load_tokenizer(other), DATA_DIR, tmp_path / "cache")
    assert not hit3 and path3 != path
    with pytest.raises(UserError, match="built with tokenizer"):
        cache.check_tokenizer(load_tokenizer(other))


def test_held_out_fraction_without_validation_file(tmp_path, tok4k):
    path, _ = prepare(load_tokenizer(tok4k), TRAIN_HEAD, tmp_path / "cache", val_fraction=0.1)
    sp = TokenCache.open(path).manifest["splits"]
    assert sp["val"]["documents"] == 231 and sp["train"]["documents"] == 2316 - 231


def _shards(path):
    return {f.name: f.read_bytes() for f in sorted(path.iterdir()) if f.suffix in (".bin", ".npy")}


def test_interrupted_prepare_resumes_without_redoing_finished_units(tmp_path, tok4k, monkeypatch):
    import tinystories.data.cache as cache_mod
    import tinystories.data.text as textdata

    monkeypatch.setattr(textdata, "UNIT_BYTES", 200_000)  # the 2 MB head in ~10 units
    tok = load_tokenizer(tok4k)
    built = []
    original = cache_mod.build_unit

    def crash_on_fourth(*a, **k):
        if len(built) == 3:
            raise KeyboardInterrupt
        built.append(a[2].name)
        return original(*a, **k)

    monkeypatch.setattr(cache_mod, "build_unit", crash_on_fourth)
    with pytest.raises(KeyboardInterrupt):
        prepare(tok, DATA_DIR, tmp_path / "cache", workers=1)
    [cache_dir] = list((tmp_path / "cache").iterdir())
    assert not (cache_dir / "manifest.json").exists()  # an interrupted build never looks complete
    with pytest.raises(UserError, match="not a token cache"):
        TokenCache.open(cache_dir)
    assert len(built) == 3 and not list(cache_dir.glob(".*tmp*"))
    first = list(built)
    built.clear()
    monkeypatch.setattr(cache_mod, "build_unit", lambda *a, **k: built.append(a[2].name) or original(*a, **k))
    path, hit = prepare(tok, DATA_DIR, tmp_path / "cache", workers=1)
    assert not hit and path == cache_dir
    assert not set(first) & set(built) and len(built) > 3  # only the units not finished before
    # the same bytes as an uninterrupted build
    other, _ = prepare(tok, DATA_DIR, tmp_path / "fresh", workers=1)
    assert _shards(path) == _shards(other)
    assert TokenCache.open(path).manifest["splits"] == TokenCache.open(other).manifest["splits"]


def test_part_of_the_cache_is_extended_not_rebuilt(tmp_path, tok4k, monkeypatch):
    import tinystories.data.cache as cache_mod
    import tinystories.data.text as textdata

    monkeypatch.setattr(textdata, "UNIT_BYTES", 200_000)
    tok = load_tokenizer(tok4k)
    built = []
    original = cache_mod.build_unit
    monkeypatch.setattr(cache_mod, "build_unit", lambda *a, **k: built.append(a[2].name) or original(*a, **k))
    path, hit = prepare(tok, DATA_DIR, tmp_path / "cache", train_tokens=100_000, workers=1)
    m = TokenCache.open(path).manifest
    assert not hit and m["part"]["units"] < m["part"]["of"] and "-part" in m["fingerprint"]
    assert 100_000 <= m["splits"]["train"]["tokens"] < 200_000
    assert m["splits"]["val"]["documents"] == 1  # the whole validation file, always
    train = TokenCache.open(path).split("train")
    assert len(train.docs) == m["splits"]["train"]["documents"] and train.docs[-1, 0] < train.tokens
    # a smaller request is a hit; the whole cache adds only the missing units
    assert prepare(tok, DATA_DIR, tmp_path / "cache", train_tokens=50_000, workers=1) == (path, True)
    first = list(built)
    built.clear()
    path2, hit2 = prepare(tok, DATA_DIR, tmp_path / "cache", workers=1)
    assert path2 == path and not hit2 and not set(first) & set(built)
    m2 = TokenCache.open(path).manifest
    assert m2["part"] is None and m2["splits"]["train"]["documents"] == 2316
    assert prepare(tok, DATA_DIR, tmp_path / "cache", train_tokens=50_000, workers=1) == (path, True)


def test_worker_processes_build_the_same_cache(tmp_path, tok4k, monkeypatch):
    import tinystories.data.text as textdata

    monkeypatch.setattr(textdata, "UNIT_BYTES", 300_000)
    tok = load_tokenizer(tok4k)
    one, _ = prepare(tok, TRAIN_HEAD, tmp_path / "one", val_fraction=0.1, workers=1)
    two, _ = prepare(tok, TRAIN_HEAD, tmp_path / "two", val_fraction=0.1, workers=2)
    assert _shards(one) == _shards(two)
    cache = TokenCache.open(two)
    train = cache.split("train")
    assert len(train.shards) > 1
    stream = train.stream()  # several shards, read as one sequence without loading them whole
    whole = np.concatenate([np.asarray(s) for s in train.shards])
    assert len(stream) == len(whole) == train.tokens
    for a, b in ((0, 10), (len(train.shards[0]) - 3, len(train.shards[0]) + 5), (5, len(whole)), (-7, None)):
        assert np.array_equal(stream[a:b], whole[a:b])
    assert stream[len(train.shards[0])] == whole[len(train.shards[0])]
    docs = train.docs
    assert np.all(whole[np.asarray(docs[:, 0])] == tok.doc_start_id)  # global offsets across the shards
    # the held-out story of each unit: 1 in 10 of every unit's stories, 2316 in all
    sp = cache.manifest["splits"]
    assert sp["train"]["documents"] + sp["val"]["documents"] == 2316 and 200 < sp["val"]["documents"] < 260


def test_file_units_end_at_story_boundaries(tmp_path):
    from tinystories.data.text import file_units, unit_documents

    for unit in (1_000, 50_000, 10**9):
        units = file_units(TRAIN_HEAD, unit)
        assert units[0][0] == 0 and units[-1][1] == TRAIN_HEAD.stat().st_size
        assert all(a[1] == b[0] for a, b in zip(units, units[1:]))
        docs = [d for a, b in units for d in unit_documents(TRAIN_HEAD, a, b)]
        assert docs == list(iter_documents([TRAIN_HEAD])) and len(docs) == 2316
    text = tmp_path / "stories.txt"  # blank-line separated plain text, CRLF line ends
    text.write_bytes(b"one\r\nstory\r\n\r\ntwo\r\n \r\n\r\nthree\r\n\r\n" * 50)
    docs = [d for a, b in file_units(text, 20) for d in unit_documents(text, a, b)]
    assert docs == ["one\r\nstory", "two", "three"] * 50


def test_json_report_replaces_only_an_earlier_report(tmp_path, tok4k):
    args = ("tokenizer", "report", "--tokenizer", tok4k, "--from", TRAIN_HEAD, "--stories", "20", "--json")
    notes = tmp_path / "notes.md"
    notes.write_text("# my notes\n")
    one_line_error(run_cli(*args, notes), "--json", "notes.md", "not a JSON report")
    assert notes.read_text() == "# my notes\n"
    one_line_error(run_cli(*args, tmp_path), "is a directory")
    out = tmp_path / "reports" / "tok.json"  # a missing parent directory is made
    for _ in range(2):  # a rerun replaces its own report
        r = run_cli(*args, out)
        assert r.returncode == 0, r.stderr
        assert json.loads(out.read_text())[0]["vocab_size"] == 4096
    assert [p.name for p in out.parent.iterdir()] == ["tok.json"]  # no temporary file left


def test_prepare_cli_reports_cache_hit(tmp_path, tok4k):
    args = ("data", "prepare", "--tokenizer", tok4k, "--from", DATA_DIR, "--data-dir", tmp_path / "d")
    first, second = run_cli(*args), run_cli(*args)
    assert first.returncode == 0 and "built in" in first.stdout
    assert second.returncode == 0 and "cache hit" in second.stdout


def test_uint32_for_large_vocabularies(tmp_path):
    # the Llama 2 tokenizer fits uint16; check the choice rule directly on the manifest
    path, _ = prepare(load_tokenizer(LLAMA2_TOKENIZER), TRAIN_HEAD, tmp_path / "c", max_stories=50)
    m = json.loads((path / "manifest.json").read_text())
    assert m["dtype"] == "uint16" and m["tokenizer"]["vocab_size"] == 32000
    assert np.fromfile(path / "train-00000.bin", dtype=np.uint16).max() < 32000
