"""Every story statistic on hand-made examples with known answers."""

from __future__ import annotations

import pytest

from tinystories.evaluation.story_stats import (
    agreement_errors,
    distinct_n,
    doubled_words,
    repeated_ngrams,
    sentences,
    story_stats,
    unbalanced_quotes,
    vocabulary,
    wants_an,
    well_formed,
    words,
)


def test_words_lowercase_and_apostrophes():
    assert words("Tom didn't see The cat, 3 times!") == ["tom", "didn't", "see", "the", "cat", "times"]


def test_articles_per_100_words_and_share():
    s = story_stats(["The cat saw a dog and an owl.", "Tom ran home."])  # 8 + 3 words, 3 articles
    assert s["words"] == 11
    assert s["articles_per_100_words"] == pytest.approx(300 / 11)
    assert s["stories_with_articles"] == 0.5
    assert s["mean_words"] == 5.5


def test_articles_are_whole_words_case_insensitive():
    s = story_stats(["THE Apple and another theory at an"])  # "THE", "an"; not "another"/"theory"/"at"
    assert s["articles_per_100_words"] == pytest.approx(200 / 7)


@pytest.mark.parametrize("text,errors", [
    ("He ate a apple.", ["a apple"]),
    ("She saw an dog.", ["an dog"]),
    ("A elephant came.", ["A elephant"]),
    ("An cat", ["An cat"]),
    ("an apple, a dog, an egg, a hat", []),
    ("an hour, an honest man, an heir", []),  # silent h
    ("a unicorn, a useful tool, a European, a one-eyed cat, a ewe, a uniform", []),  # "you"/"w" sounds
    ("an unicorn", ["an unicorn"]),
    ("a hour", ["a hour"]),
    ("an umbrella and an uncle", []),
    ("a x and a 5", []),  # single letters and numbers are not judged
    ("a is and an and", []),  # function words: a grammar slip, not an agreement error
    ("I have a\napple", ["a apple"]),
])
def test_agreement_errors(text, errors):
    assert agreement_errors(text) == errors


def test_agreement_error_rate():
    s = story_stats(["He ate a apple and an dog."])  # 7 words, 2 errors
    assert s["agreement_errors"] == 2
    assert s["agreement_errors_per_1k_words"] == pytest.approx(2000 / 7)
    assert s["examples"]["agreement_errors"] == ["a apple", "an dog"]


def test_wants_an():
    assert wants_an("apple") is True and wants_an("dog") is False and wants_an("x") is None


def test_doubled_words():
    assert doubled_words("the the cat sat sat. The the end") == ["the the", "sat sat", "The the"]
    assert doubled_words("the then; there the; a ant") == []
    s = story_stats(["She saw the the dog."])
    assert s["doubled_words"] == 1 and s["doubled_words_per_1k_words"] == pytest.approx(200.0)


def test_sentences_and_well_formed():
    text = 'Tom ran. the dog sat. "Wow!" said Sue. "Hi!" Tom smiled. He was happy'
    got = sentences(text)
    assert got == ["Tom ran.", "the dog sat.", '"Wow!" said Sue.', '"Hi!"', "Tom smiled.", "He was happy"]
    assert [well_formed(s) for s in got] == [True, False, True, True, True, False]
    s = story_stats([text])
    assert s["sentences"] == 6 and s["well_formed_sentences"] == pytest.approx(4 / 6)


def test_sentences_line_breaks():
    assert sentences("One day.\nTwo days") == ["One day.", "Two days"]


def test_unbalanced_quotes():
    assert unbalanced_quotes('She said, "hi') is True
    assert unbalanced_quotes('She said, "hi." He said, "bye."') is False
    assert unbalanced_quotes("“hi” and “bye") is True
    assert unbalanced_quotes("no quotes, it's fine") is False
    s = story_stats(['"a"', '"b', "c"])
    assert s["unbalanced_quotes"] == pytest.approx(1 / 3)


def test_distinct_n():
    ws = words("the cat the cat the dog")  # 6 words
    assert distinct_n(ws, 1) == pytest.approx(3 / 6)  # the, cat, dog
    assert distinct_n(ws, 2) == pytest.approx(3 / 5)  # the cat, cat the, the dog
    assert distinct_n(ws, 3) == pytest.approx(3 / 4)  # the cat the, cat the cat, cat the dog
    assert distinct_n(["a"], 2) is None
    s = story_stats(["the cat the cat the dog", "a b"])  # per-story mean; "a b" has no 3-gram
    assert s["distinct_1"] == pytest.approx((0.5 + 1.0) / 2)
    assert s["distinct_3"] == pytest.approx(0.75)


def test_repeated_4grams():
    ws = words("I like the cat. I like the cat. I like the dog")  # 12 words, 9 4-grams
    # 4-grams: [i like the cat] [like the cat i] [the cat i like] [cat i like the] [i like the cat]*
    # [like the cat i]* [the cat i like]* [cat i like the]* [i like the dog] -> 4 repeats
    assert repeated_ngrams(ws, 4) == (4, 9)
    s = story_stats(["I like the cat. I like the cat. I like the dog", "one two three four five"])
    assert s["repeated_4gram_rate"] == pytest.approx(4 / 11)


def test_invented_words():
    vocab = vocabulary(["The cat sat on the mat.", "A dog ran."])
    s = story_stats(["The cat blorped on the zib zib."], vocab)  # 7 words: blorped, zib, zib unseen
    assert s["invented_words"] == pytest.approx(3 / 7)
    assert s["invented_examples"] == ["zib", "blorped"]
    assert story_stats(["The cat"])["invented_words"] is None  # no vocabulary, no figure


def test_ended_share():
    s = story_stats(["a", "b", "c", "d"], ended=[True, False, True, True])
    assert s["ended"] == 0.75
    assert story_stats(["a"])["ended"] is None


def test_empty_input():
    s = story_stats([])
    assert s["stories"] == 0 and s["articles_per_100_words"] is None and s["distinct_1"] is None
