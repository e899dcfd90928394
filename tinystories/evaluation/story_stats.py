"""Pure-text statistics of stories: the same figures for generated and for real stories, side by side.

Every function takes plain strings, so each statistic is tested on hand-made examples with known answers.
Words are runs of letters (with inner apostrophes: "didn't"), compared lower-cased.

- articles per 100 words ("a", "an", "the") and the share of stories that use one;
- "a"/"an" agreement errors ("a apple", "an dog"), by the first letter with the usual exceptions
  ("an hour", "a unicorn", "a one-eyed cat", "a European");
- doubled words ("the the");
- the share of sentences that start with a capital letter and end with . ! or ?;
- the share of stories with unbalanced double quotes;
- distinct-1/2/3 (unique n-grams / n-grams, per story, averaged) and the repeated 4-gram rate;
- invented words: the share of words never seen in the training text;
- mean length in words, and the share of stories that ended with the end-of-story token.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable

WORD_RE = re.compile(r"[A-Za-z]+(?:['’][A-Za-z]+)*")
ARTICLES = frozenset({"a", "an", "the"})
# "a" or "an" directly followed (only whitespace between) by a word
_ARTICLE_NEXT_RE = re.compile(r"\b([Aa]n?)\s+([A-Za-z][A-Za-z'’-]*)")
_DOUBLED_RE = re.compile(r"\b([A-Za-z]+)\s+\1\b", re.IGNORECASE)
# sentence boundary: terminal punctuation, optional closing quote(s), whitespace
_BOUNDARY_RE = re.compile(r"([.!?]+)([\"”’']*)\s+(?=\S)")
_OPEN_QUOTES = "\"“‘'(["
_CLOSE_QUOTES = "\"”’')]"

# vowel letter but consonant sound -> "a": a unicorn, a useful, a one-eyed, a European, a ewe
_A_BEFORE_VOWEL_LETTER = re.compile(
    r"^(uni|use|usu|uti|uto|ura|uro|ure|euro|eu|ewe|one\b|once|onesie|ukulele|u$)", re.I)
# consonant letter but vowel sound -> "an": an hour, an honest, an heir, an honor/honour
_AN_BEFORE_CONSONANT = re.compile(r"^(hour|honest|honor|honour|heir|herb)", re.I)


def words(text: str) -> list[str]:
    return [w.lower().replace("’", "'") for w in WORD_RE.findall(text)]


# words that cannot follow an article at all ("a is", "an and"): a grammar slip, not an a/an agreement error
_NOT_AFTER_ARTICLE = frozenset(
    "is are was were am and or but if as at in on of to it its an a the he she they we you i his her my our "
    "their him them us up so".split())


def wants_an(word: str) -> bool | None:
    """Whether `word` takes "an" (True), "a" (False); None when it cannot tell (a single letter, a number,
    a function word that cannot follow an article)."""
    w = word.strip("'’-").lower()
    if len(w) < 2 or not w[0].isalpha() or w in _NOT_AFTER_ARTICLE:
        return None
    if _AN_BEFORE_CONSONANT.match(w):
        return True
    if w[0] in "aeiou":
        return not _A_BEFORE_VOWEL_LETTER.match(w)
    return False


def agreement_errors(text: str) -> list[str]:
    """The "a apple" / "an dog" pairs in `text` (case-insensitive), as written."""
    errors = []
    for m in _ARTICLE_NEXT_RE.finditer(text):
        art, nxt = m.group(1).lower(), m.group(2)
        an = wants_an(nxt)
        if an is None:
            continue
        if (art == "an") != an:
            errors.append(f"{m.group(1)} {nxt}")
    return errors


def doubled_words(text: str) -> list[str]:
    """Immediately repeated words ("the the"), case-insensitive."""
    return [m.group(0) for m in _DOUBLED_RE.finditer(text)]


def sentences(text: str) -> list[str]:
    """Split after . ! ? (and a closing quote), except a quoted "...!" or "...?" followed by a lower-case word
    (`"Wow!" said Sue.` is one sentence)."""
    out, start = [], 0
    for m in _BOUNDARY_RE.finditer(text):
        nxt = text[m.end()] if m.end() < len(text) else ""
        if m.group(2) and m.group(1)[-1] in "!?" and nxt.islower():
            continue
        out.append(text[start : m.end()].strip())
        start = m.end()
    tail = text[start:].strip()
    if tail:
        out.append(tail)
    # a line break also ends a sentence
    return [s.strip() for part in out for s in part.split("\n") if s.strip()]


def well_formed(sentence: str) -> bool:
    """Starts with a capital letter (after opening quotes) and ends with . ! or ? (before closing quotes)."""
    body = sentence.strip().lstrip(_OPEN_QUOTES + " ")
    end = sentence.strip().rstrip(_CLOSE_QUOTES + " ")
    return bool(body) and body[0].isupper() and bool(end) and end[-1] in ".!?"


def unbalanced_quotes(text: str) -> bool:
    """An odd number of straight double quotes, or curly opening and closing quotes that do not pair up."""
    return text.count('"') % 2 == 1 or text.count("“") != text.count("”")


def ngrams(ws: list[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(ws[i : i + n]) for i in range(len(ws) - n + 1)]


def distinct_n(ws: list[str], n: int) -> float | None:
    """Unique n-grams / n-grams of one story (None when it has fewer than n words)."""
    grams = ngrams(ws, n)
    return len(set(grams)) / len(grams) if grams else None


def repeated_ngrams(ws: list[str], n: int = 4) -> tuple[int, int]:
    """(occurrences that repeat an earlier n-gram of the same story, all n-gram occurrences)."""
    grams = ngrams(ws, n)
    return len(grams) - len(set(grams)), len(grams)


def vocabulary(texts: Iterable[str]) -> set[str]:
    """The lower-cased words of a text collection (the training vocabulary for invented-word counts)."""
    vocab: set[str] = set()
    for t in texts:
        vocab.update(words(t))
    return vocab


def _mean(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def _ratio(a: float, b: float, scale: float = 1.0) -> float | None:
    return scale * a / b if b else None


def story_stats(stories: list[str], train_vocab: set[str] | None = None, ended: list[bool] | None = None) -> dict:
    """All statistics over a list of stories. Rates are pooled over all words/sentences unless named per story."""
    n = len(stories)
    ws_all = [words(s) for s in stories]
    n_words = sum(len(w) for w in ws_all)
    n_articles = sum(1 for ws in ws_all for w in ws if w in ARTICLES)
    agree = [agreement_errors(s) for s in stories]
    doubled = [doubled_words(s) for s in stories]
    sents = [x for s in stories for x in sentences(s)]
    rep = [repeated_ngrams(ws, 4) for ws in ws_all]
    out: dict = {
        "stories": n,
        "words": n_words,
        "mean_words": _ratio(n_words, n),
        "articles_per_100_words": _ratio(n_articles, n_words, 100.0),
        "stories_with_articles": _ratio(sum(1 for ws in ws_all if any(w in ARTICLES for w in ws)), n),
        "agreement_errors": sum(len(a) for a in agree),
        "agreement_errors_per_1k_words": _ratio(sum(len(a) for a in agree), n_words, 1000.0),
        "doubled_words": sum(len(d) for d in doubled),
        "doubled_words_per_1k_words": _ratio(sum(len(d) for d in doubled), n_words, 1000.0),
        "sentences": len(sents),
        "well_formed_sentences": _ratio(sum(1 for s in sents if well_formed(s)), len(sents)),
        "unbalanced_quotes": _ratio(sum(1 for s in stories if unbalanced_quotes(s)), n),
        "distinct_1": _mean([distinct_n(ws, 1) for ws in ws_all]),
        "distinct_2": _mean([distinct_n(ws, 2) for ws in ws_all]),
        "distinct_3": _mean([distinct_n(ws, 3) for ws in ws_all]),
        "repeated_4gram_rate": _ratio(sum(r for r, _ in rep), sum(t for _, t in rep)),
        "invented_words": None,
        "invented_examples": [],
        "ended": _ratio(sum(1 for e in ended if e), len(ended)) if ended is not None else None,
        "examples": {
            "agreement_errors": [e for a in agree for e in a][:5],
            "doubled_words": [d for ds in doubled for d in ds][:5],
        },
    }
    if train_vocab is not None:
        unseen = Counter(w for ws in ws_all for w in ws if w not in train_vocab)
        out["invented_words"] = _ratio(sum(unseen.values()), n_words)
        out["invented_examples"] = [w for w, _ in unseen.most_common(8)]
    return out


# (key, label, format) for the table eval prints
TABLE_ROWS = [
    ("stories", "stories", "{:.0f}"),
    ("mean_words", "mean length (words)", "{:.1f}"),
    ("ended", "ended with end-of-story token", "{:.0%}"),
    ("articles_per_100_words", "articles per 100 words", "{:.2f}"),
    ("stories_with_articles", "stories with an article", "{:.0%}"),
    ("agreement_errors_per_1k_words", "a/an errors per 1k words", "{:.2f}"),
    ("doubled_words_per_1k_words", "doubled words per 1k words", "{:.2f}"),
    ("well_formed_sentences", "sentences Capital...end.", "{:.1%}"),
    ("unbalanced_quotes", "stories with unbalanced quotes", "{:.1%}"),
    ("distinct_1", "distinct-1 (per story)", "{:.3f}"),
    ("distinct_2", "distinct-2 (per story)", "{:.3f}"),
    ("distinct_3", "distinct-3 (per story)", "{:.3f}"),
    ("repeated_4gram_rate", "repeated 4-grams", "{:.1%}"),
    ("invented_words", "words never seen in training", "{:.2%}"),
]


def format_value(value, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)
