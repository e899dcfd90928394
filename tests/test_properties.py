"""Property-based tests (Hypothesis) for the parts whose input space is large: the text readers, the stop-string
hold-back of streaming, `--set` config overrides and the BPE tokenizer's round trip. Each property runs a bounded
number of examples (a few seconds each on 2 CPU cores)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from conftest import TRAIN_HEAD  # noqa: E402
from tinystories.core.errors import UserError  # noqa: E402

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def one_line(e: UserError, *needles: str) -> None:
    msg = str(e)
    assert msg and "\n" not in msg and "\r" not in msg, repr(msg)
    for needle in needles:
        assert needle in msg, (needle, msg)


# ------------------------------------------------------------------------------------------------ text readers

# pieces of the formats the readers know, and of what breaks them, so that random files look like real ones
FRAGMENTS = [b"<|endoftext|>", b"\n", b"\n\n", b"\r\n", b" ", b"\t", b"Once upon a time", b"Lily", b".", b"\xc3\xa9",
             b"{", b"}", b"[", b"]", b'"story"', b'"text"', b":", b",", b'"', b"null", b"1e999", b"\\ud800", b"\\",
             b"\xff", b"\xe2\x82", b"\x00", b"NaN", b"[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[["]
file_bytes = st.one_of(st.binary(max_size=300), st.lists(st.sampled_from(FRAGMENTS), max_size=40).map(b"".join))


@pytest.fixture(scope="module")
def scratch():
    with tempfile.TemporaryDirectory() as d:
        yield Path(d)


@FAST
@given(raw=file_bytes, suffix=st.sampled_from([".txt", ".json", ".jsonl"]))
@example(raw=b"[" * 100_000, suffix=".json")  # nesting deeper than Python's JSON parser recurses
@example(raw=b"[" * 100_000 + b"\n", suffix=".jsonl")
@example(raw=b'{"story": "\\ud800 half a character"}', suffix=".json")
def test_any_bytes_read_as_documents_or_one_line_error(scratch, raw, suffix):
    from tinystories.data.text import iter_documents

    path = scratch / f"stories{suffix}"
    path.write_bytes(raw)
    try:
        docs = list(iter_documents([path]))
    except UserError as e:
        one_line(e, str(path))
        return
    for doc in docs:
        assert isinstance(doc, str) and doc and doc == doc.strip()
        doc.encode("utf-8")  # text the tokenizer can take: no lone surrogate


# ------------------------------------------------------------------------------------------------ stop strings

stops = st.lists(st.text(alphabet="ab c.\n", max_size=4), max_size=4)


@st.composite
def split_text(draw):
    """A text and a split of it into pieces (how tokens decode): any cut points."""
    text = draw(st.text(alphabet="ab c.\né", max_size=40))
    cuts = sorted(draw(st.sets(st.integers(0, len(text)), max_size=12)))
    bounds = [0, *cuts, len(text)]
    return text, [text[i:j] for i, j in zip(bounds, bounds[1:])]


@FAST
@given(case=split_text(), stop=stops)
@example(case=("abc", ["a", "b", "c"]), stop=["abc", "b"])
def test_streamed_stop_strings_match_the_text_cut_at_the_first_stop(case, stop):
    from tinystories.inference.engine import StopStrings

    text, pieces = case
    s, out, hit = StopStrings(stop), [], False
    for piece in pieces:
        emit, hit = s.push(piece)
        out.append(emit)
        if hit:
            break
    if not hit:
        out.append(s.release())
    # the reference, without any hold-back: the generation stops at the first piece after which the text holds a
    # stop string, and the text ends where the earliest stop string in it begins (as vLLM does: a stop string
    # that completes first wins over a longer one that began earlier but is not complete yet)
    expected, seen = text, ""
    for piece in pieces:
        seen += piece
        found = [seen.find(x) for x in stop if x and x in seen]
        if found:
            expected = seen[: min(found)]
            break
    assert "".join(out) == expected
    assert hit == any(x and x in text for x in stop)


# ------------------------------------------------------------------------------------------------ --set overrides

KEYS = ["model.dim", "model.n_layers", "model.n_heads", "model.max_seq_len", "model.dropout", "train.lr",
        "train.batch_size", "train.max_steps", "train.dtype", "train.compile", "data.val_fraction", "tokenizer.path",
        "model", "train", "nope.x", "model.nope", "model.dim.x", "", ".", "a..b"]
VALUES = st.one_of(st.sampled_from(["64", "0", "-1", "3e-4", ".inf", ".nan", "null", "true", "[1, 2]", "{a: 1}",
                                    "[", "{", "]", "a: b: c", "!!python/object:os.system", "&x", "*x", "'", '"',
                                    "%", "@", "`", "2020-01-01", "0x10", "1_000", "", "- a", "? a", "|", ">", "#"]),
                   st.text(max_size=12))


@FAST
@given(items=st.lists(st.tuples(st.one_of(st.sampled_from(KEYS), st.text(max_size=10)), VALUES), max_size=4),
       bare=st.booleans())
@example(items=[("train.lr", "[")], bare=False)
@example(items=[("model.n_heads", "0")], bare=False)  # was a ZeroDivisionError, not a one-line error
@example(items=[("model.dim", "!!python/object/apply:os.system ['true']")], bare=False)
def test_set_overrides_give_a_valid_config_or_one_line_error(items, bare):
    from tinystories.core.config import RunConfig, load_config

    overrides = [k if bare and i == 0 else f"{k}={v}" for i, (k, v) in enumerate(items)]
    try:
        cfg = load_config(None, overrides)
    except UserError as e:
        one_line(e, "--set" if overrides else "")
        return
    assert isinstance(cfg, RunConfig)
    RunConfig.model_validate(cfg.model_dump())  # what it holds is itself valid


# ------------------------------------------------------------------------------------------------ tokenizer


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    """A 512-token byte-level BPE trained on the first 300 real stories."""
    from tinystories.data.text import iter_documents
    from tinystories.data.tokenizer import load_tokenizer, train_bpe

    out = tmp_path_factory.mktemp("bpe512")
    return load_tokenizer(train_bpe(iter_documents([TRAIN_HEAD], 300), 512, out))


@FAST
@given(text=st.text(max_size=200))
@example(text="Once upon a time<|endoftext|>there was")
@example(text="\x00\r\n\t \u200b\ufeff\U0001f600 e\u0301")
def test_bpe_round_trip_on_any_unicode(bpe, text):
    assert bpe.decode(bpe.encode(text)) == text
