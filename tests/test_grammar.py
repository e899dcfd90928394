"""Grammar by CMU Link Grammar's `link-parser` (the real parser, installed by `apt-get install link-grammar`):
hand-written good and broken sentences, the pinned options that change verdicts, the protocol's corner cases
(lines the parser would read as commands, sentences too long to send, a killed and restarted parser), the real
valid head's rate, per-story scores, and the missing-parser path (a PATH without it)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from conftest import VALID_HEAD, run_cli
from tinystories.evaluation.grammar import (
    FAILED,
    NOT_MEASURED,
    PARSED,
    TIMED_OUT,
    LinkParser,
    check_sentences,
    find_parser,
    given_sentences,
    grammar_stats,
)
from tinystories.evaluation.story_stats import sentences

if find_parser() is None:
    pytest.fail("link-parser is not installed: apt-get install link-grammar (or brew install link-grammar)",
                pytrace=False)

GOOD = ["The dog ran to the park.", "Lily and Ben played with a red ball.", '"Hi," said Tom.',
        "She was happy because her mom gave her a big hug.", "Once upon a time, there was a little girl named Lily.",
        "They went home and ate some cake.", "The cat sat on the mat.", 'Tom said, "Hi."',
        "He wanted to climb the tall tree.", 'Mom smiled and said, "Thank you!"', "It was a sunny day.",
        "The bird flew over the house."]
BROKEN = ["The dog is run to park the happy very.", "He go home.", "The the cat sat.", "Dog big the ran park.",
          "She were happy because.", "They goes to the park yesterday.", "A cat sat on the.",
          "Lily and happy was the.", "The girl saw a.", "Ran the dog quickly the.", "He is a boys.",
          "We was playing with."]


def valid_lines(n: int) -> list[str]:
    lines = VALID_HEAD.read_text(encoding="utf-8").splitlines()
    return [x for x in lines if x.strip()][:n]


@pytest.fixture(scope="module")
def parser():
    with LinkParser() as p:
        yield p


def test_good_and_broken_sentences(parser):
    assert parser.check(GOOD) == [PARSED] * len(GOOD)
    assert parser.check(BROKEN) == [FAILED] * len(BROKEN)
    assert parser.check([]) == []


def test_dialogue_is_one_sentence():
    assert sentences('"Hi," said Tom. He ran home.') == ['"Hi," said Tom.', "He ran home."]
    assert sentences('"Wow!" said Sue. "Look!"') == ['"Wow!" said Sue.', '"Look!"']


def test_lines_the_parser_would_read_as_commands_are_sentences(parser):
    # "!x" is a parser command, "%" a comment, "*" batch mode's "expected to fail" label: sent as sentences
    got = parser.check(["!verbosity=0", "The dog ran.", "%The cat sat.", "*He go home.", "!echo=0", "He go home.",
                        "The cat sat."])
    assert got[1] == PARSED and got[3] == FAILED and got[5] == FAILED and got[6] == PARSED
    assert parser.check(GOOD[:3]) == [PARSED] * 3  # the parser's settings were not changed


def test_long_and_odd_sentences_do_not_break_the_stream(parser):
    too_long = "The dog ran and " * 100 + "the cat sat."  # over 2,046 bytes would end the process
    got = parser.check(["The dog ran.", too_long, "A\x00B.", "He\tran\nhome.", "😀 🙂", "The cat sat."])
    assert got[0] == PARSED and got[1] == FAILED and got[5] == PARSED
    assert parser.restarts == 0


def test_a_parser_that_does_not_answer_in_time_is_restarted():
    with LinkParser(time_limit=1) as p:
        p.check(["The dog ran."])  # started
        p.watchdog = 0.001  # no parse answers in a millisecond: each sentence is killed and marked
        slow = ("The car of the hat of the dog, the girl over the house of the box, the hat under the house on the "
                "bird, the box by the river near the girl, the man in the bird under the box saw the sun.")
        assert p.check([slow, slow]) == [TIMED_OUT, TIMED_OUT] and p.restarts == 2
        p.watchdog = 2 * p.time_limit + 3.0
        assert p.check([slow, "He go home."]) == [PARSED, FAILED]  # a fresh process, in step


@pytest.mark.slow
def test_pinned_limit_matters():
    # P.P. rules are checked on at most `limit` linkages: limit=1 rejects far more real sentences
    sents = [s for line in valid_lines(60) for s in sentences(line)]
    pinned = check_sentences(sents, workers=1)
    with LinkParser(options={"limit": "1"}) as p:
        small = p.check(sents)
    assert pinned.count(FAILED) >= 5 and small.count(FAILED) >= 2 * pinned.count(FAILED)


def test_pinned_no_spelling_guesses():
    # "wantd" is unknown; with spelling guesses (hunspell installed) it would be read as "wanted" and pass
    with LinkParser() as p:
        assert p.check(["Tim wantd to play."]) == [FAILED]
    if Path("/usr/share/hunspell/en_US.dic").is_file():
        with LinkParser(options={"spell": "7"}) as p:
            assert p.check(["Tim wantd to play."]) == [PARSED]


@pytest.mark.slow
def test_valid_head_rate_in_measured_band():
    # measured: 93.1% of all 15,245 sentences of the valid head; 93.6% of the first 300 lines (docs/eval.md)
    st = grammar_stats(valid_lines(150))
    assert st["grammar_measured"] and st["grammar_sentences"] > 500
    assert 0.90 <= st["grammatical_sentences"] <= 0.965, st["grammatical_sentences"]
    assert st["grammar_timed_out"] == 0 and 8.5 <= st["grammar_score_mean"] <= 9.7


def test_story_scores_prompts_and_cut_stories():
    stories = ["The dog ran. He go home.", "Tom had a big red ball. The ball was red. He", "", "Once upon a time"]
    st = grammar_stats(stories, skip=[0, 1, 0, 0], cut=[False, True, False, False])
    # story 2: the prompt's sentence and the unfinished "He" are not judged; story 3 has no sentence; story 4
    # ended there (not cut), so "Once upon a time" is judged, and the parser rejects it
    assert st["grammar_scores"] == [5.0, 10.0, None, 0.0] and st["grammar_sentences"] == 4
    assert grammar_stats(stories[3:], cut=[True])["grammar_scores"] == [None]  # cut: unfinished, not judged
    assert st["grammatical_sentences"] == pytest.approx(2 / 4) and st["grammatical_stories"] == pytest.approx(1 / 3)
    assert st["grammar_errors"][0] == {"story": 0, "sentence": "He go home.", "verdict": FAILED}
    assert given_sentences("Tom had a big red ball.", "Tom had a big red ball. He ran.") == 1
    assert given_sentences("Once upon a time", "Once upon a time, a dog ran.") == 0
    assert given_sentences("Mom said,", "Hi.") == 0


def _path_without_parser(tmp_path: Path) -> str:
    keep = [d for d in os.environ.get("PATH", "").split(os.pathsep) if d and not (Path(d) / "link-parser").exists()]
    return os.pathsep.join(keep + [str(Path(sys.executable).parent)])


def test_missing_parser_is_not_measured(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", _path_without_parser(tmp_path))
    assert find_parser() is None
    assert grammar_stats(GOOD) == {"grammar_measured": False, "grammar_note": NOT_MEASURED}
    from tinystories.evaluation.doctor import check_grammar

    c = check_grammar([{"prompt": "", "text": GOOD[0], "ended": True}], GOOD)
    assert c.status == "SKIP" and c.detail == NOT_MEASURED


@pytest.mark.slow
def test_missing_parser_is_reported_not_fatal(tmp_path, random_checkpoint):
    env = {"PATH": _path_without_parser(tmp_path)}
    out = tmp_path / "eval.json"
    r = run_cli("eval", "--checkpoint", random_checkpoint, "--text", VALID_HEAD, "--max-tokens", "200",
                "--num-stories", "2", "--max-new-tokens", "8", "--show-grammar-errors", "3", "--json", out, env=env)
    assert r.returncode == 0, r.stderr
    assert NOT_MEASURED in r.stdout and "apt-get install link-grammar" in r.stdout and "Traceback" not in r.stderr
    import json

    res = json.loads(out.read_text())
    assert res["stories"]["model"]["grammar_measured"] is False
    assert res["stories"]["model"]["grammar_note"] == NOT_MEASURED
