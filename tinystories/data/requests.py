"""Story requests: the words, features and summary a story was asked for, as TinyStories-Instruct lays them out.

A request is rendered in front of its story, one line per part, in a fixed order:

    Words: hang, foot, cute
    Features: Dialogue
    Summary: A girl finds a cute bird and hangs a feeder from her foot stool.
    Story: Once upon a time ...

The official JSON shards carry each story's request (`instruction.words`, `instruction.features`, `summary`).
Plain text has none, so one is derived from the story itself, deterministically:
- three content words: a verb, a noun and an adjective where they can be told apart. A verb is a base form the
  story also inflects (`jump` when it says `jumped` or `jumping`) or uses after `to` or a modal; a noun is a word
  after a determiner (`the`, `a`, `his`, ...) past any adjectives; an adjective is a word of a closed list of
  common ones or with an adjective suffix (-ful, -ous, -ive, -less, -able). Names, function words and words
  under three letters are never chosen. The pick among candidates is seeded by the story's hash.
- `Dialogue` when the story quotes speech. No other feature is detectable in plain text, so none is claimed.

When rendering for training, parts of the request are left out at random (seeded by the story, so a rebuilt
cache is identical) and a share of stories stays plain, so one model writes both on request and from an opening.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass, field

FORMATS = ("plain", "instruct")
# the official features, by the name the shards and the rendered text use
FEATURES = ("Dialogue", "BadEnding", "MoralValue", "Twist", "Foreshadowing", "Conflict")
FEATURE_ALIASES = {f.lower(): f for f in FEATURES} | {
    "bad-ending": "BadEnding", "bad_ending": "BadEnding", "moral": "MoralValue", "moral-value": "MoralValue",
    "moral_value": "MoralValue"}
PLAIN_SHARE = 0.2  # stories rendered without any request
WORD_BIAS = 6.0  # decoding's default logit bonus for requested words not yet used (inference/sampling.WordBias)
BIAS_RANK = 200  # ... given only where the model ranks the word's first token among its 200 likeliest
CANDIDATES = 8  # `generate` with a request: the best of this many stories drawn together (sampling.pick_candidate)
AFTER_PUSH = 4  # ... judged by how likely the model finds each pushed word and this many tokens after it
KEEP = {"words": 0.9, "features": 0.8, "summary": 0.5}  # the chance each part is kept in a rendered request
QUOTES = re.compile(r'["\u201c\u201d]')
_WORD = re.compile(r"[A-Za-z]+(?:'[a-z]+)?")

STOPWORDS = frozenset("""
a an the and or but so if then than that this these those there their they them he she it its his her him hers
we us our you your i me my mine to of in on at by for with from up down out over under into onto about after
before again very too also just not no yes all any some each every one two three was were is are am be been being
have has had do does did can could will would should may might must shall let lets said says say says asked
what when where who whom why how which while because until as once upon time day days way thing things lot lots
much many more most other others another own same such only even ever never always now here back away off
something anything nothing everything someone anyone everyone somebody nobody ok okay oh wow hello hi bye please
thank thanks sorry mom mommy dad daddy mum mama papa named name see saw seen went go goes going got get gets
""".split())
# common adjectives of children's stories; words with an adjective suffix are recognised too
ADJECTIVES = frozenset("""
happy sad big little small tiny huge large long short tall old new young good bad nice kind mean brave scared
afraid angry mad funny silly shiny bright dark soft hard warm cold hot wet dry clean dirty quiet loud fast slow
strong weak red blue green yellow pink purple orange black white brown gray grey pretty cute ugly sweet sour
fluffy fuzzy furry smooth rough sharp round flat deep high low heavy light full empty busy lazy curious proud
excited tired sleepy hungry thirsty sick friendly gentle calm wild smart clever wise shy lonely special rare
fancy plain simple messy tidy bumpy sticky shy grumpy jolly cheerful careful helpful colorful beautiful
wonderful playful thankful peaceful harmless fragile innocent rich poor real fake strange weird giant enormous
magic magical golden silver bold brilliant delicious dangerous famous favorite glad great important lucky
modest naughty nervous obedient patient polite rude selfish stubborn thoughtful tough upset wrong right ready
""".split())
ADJECTIVE_SUFFIXES = ("ful", "ous", "ive", "less", "able", "ible", "ish")
DETERMINERS = frozenset("a an the his her my your their our its this that some every each".split())
VERB_CUES = frozenset("to can could will would should must might let's didn't don't won't can't".split())
# irregular forms: base -> the other forms (verbs' past and participle, nouns' plurals)
IRREGULAR = {
    "be": "was were been is are am", "have": "has had", "do": "does did done", "go": "goes went gone",
    "see": "saw seen", "eat": "ate eaten", "run": "ran", "come": "came", "give": "gave given",
    "take": "took taken", "make": "made", "find": "found", "get": "got gotten", "say": "said",
    "think": "thought", "bring": "brought", "buy": "bought", "catch": "caught", "teach": "taught",
    "fight": "fought", "hang": "hung hanged", "sing": "sang sung", "ring": "rang rung", "swim": "swam swum",
    "drink": "drank drunk", "begin": "began begun", "sit": "sat", "stand": "stood", "understand": "understood",
    "fly": "flew flown flies", "draw": "drew drawn", "grow": "grew grown", "know": "knew known",
    "throw": "threw thrown", "blow": "blew blown", "hold": "held", "tell": "told", "sell": "sold",
    "feel": "felt", "keep": "kept", "sleep": "slept", "sweep": "swept", "leave": "left", "meet": "met",
    "lose": "lost", "win": "won", "hide": "hid hidden", "ride": "rode ridden", "write": "wrote written",
    "bite": "bit bitten", "break": "broke broken", "speak": "spoke spoken", "wake": "woke woken",
    "choose": "chose chosen", "fall": "fell fallen", "forget": "forgot forgotten", "freeze": "froze frozen",
    "steal": "stole stolen", "wear": "wore worn", "tear": "tore torn", "dig": "dug", "shine": "shone",
    "build": "built", "send": "sent", "spend": "spent", "lend": "lent", "bend": "bent", "light": "lit",
    "feed": "fed", "lead": "led", "read": "read", "hear": "heard", "pay": "paid", "lay": "laid",
    "shake": "shook shaken", "hit": "hit", "cut": "cut", "put": "put", "shut": "shut", "hurt": "hurt",
    "foot": "feet", "tooth": "teeth", "mouse": "mice", "child": "children", "man": "men", "woman": "women",
    "goose": "geese", "person": "people", "leaf": "leaves", "wolf": "wolves", "knife": "knives",
    "good": "better best", "bad": "worse worst",
}


@dataclass(frozen=True)
class Request:
    """What a story is asked to hold: up to three words, features (official names) and a summary."""

    words: tuple[str, ...] = ()
    features: tuple[str, ...] = ()
    summary: str = ""
    extra: dict = field(default_factory=dict, compare=False, repr=False)

    def __bool__(self) -> bool:
        return bool(self.words or self.features or self.summary)


def _seed(story: str, salt: str) -> random.Random:
    return random.Random(int.from_bytes(hashlib.sha256((salt + story).encode("utf-8")).digest()[:8], "big"))


def normalize_features(names) -> tuple[str, ...]:
    """Feature names as given by a user (any case, `bad-ending`, ...) as the official names; unknown ones raise
    ValueError naming them and the known ones."""
    out = []
    for name in names:
        key = str(name).strip().lower()
        if not key:
            continue
        if key not in FEATURE_ALIASES:
            raise ValueError(f"unknown feature {name!r} (known: {', '.join(f.lower() for f in FEATURES)})")
        if FEATURE_ALIASES[key] not in out:
            out.append(FEATURE_ALIASES[key])
    return tuple(out)


def normalize_words(words) -> tuple[str, ...]:
    """Requested words, stripped, empty ones dropped; ValueError for a word with a newline or more than three."""
    out = tuple(w.strip() for w in words if w and w.strip())
    if len(out) > 3:
        raise ValueError(f"at most three words can be requested (got {len(out)}: {', '.join(out)})")
    for w in out:
        if "\n" in w or "," in w:
            raise ValueError(f"requested word {w!r} holds a comma or a newline (give one word per entry)")
    return out


def has_dialogue(story: str) -> bool:
    """Whether the story quotes speech (a pair of quotation marks)."""
    return len(QUOTES.findall(story)) >= 2


def _tokens(story: str) -> list[tuple[str, bool]]:
    """(lowercase word, starts a sentence) for each word of the story."""
    out, start = [], True
    for m in re.finditer(r"[A-Za-z]+(?:'[a-z]+)?|[.!?]", story):
        w = m.group(0)
        if w in ".!?":
            start = True
            continue
        out.append((w, start))
        start = False
    return out


def _names(tokens: list[tuple[str, bool]]) -> set[str]:
    """Words the story capitalises in the middle of a sentence: names (Lily, Max), never content words."""
    return {w.lower() for w, first in tokens if not first and w[0].isupper()}


def _is_adjective(w: str) -> bool:
    return w in ADJECTIVES or (len(w) > 5 and w.endswith(ADJECTIVE_SUFFIXES))


def _content(w: str, names: set[str]) -> bool:
    return len(w) >= 3 and w.isalpha() and w not in STOPWORDS and w not in names


def _verb_candidates(words: list[str], vocab: set[str], names: set[str]) -> list[str]:
    inflected = set()
    for w in vocab:
        for suffix in ("ed", "ing"):
            if w.endswith(suffix) and len(w) > len(suffix) + 2:
                stem = w[: -len(suffix)]
                for base in (stem, stem + "e", stem[:-1] if len(stem) > 2 and stem[-1] == stem[-2] else stem):
                    if base in vocab:
                        inflected.add(base)
    cued = {b for a, b in zip(words, words[1:]) if a in VERB_CUES}
    return sorted(w for w in (inflected | cued) if _content(w, names) and not _is_adjective(w)
                  and not w.endswith(("ed", "ing", "ly")))


def _noun_candidates(words: list[str], names: set[str], verbs: set[str]) -> list[str]:
    nouns = set()
    for i, w in enumerate(words[:-1]):
        if w not in DETERMINERS:
            continue
        j = i + 1
        while j < len(words) - 1 and _is_adjective(words[j]):
            j += 1
        n = words[j]
        if _content(n, names) and not _is_adjective(n) and n not in verbs and not n.endswith(("ly", "ing")):
            nouns.add(n[:-1] if n.endswith("s") and not n.endswith("ss") and n[:-1] in words else n)
    return sorted(nouns)


def derive_request(story: str) -> Request:
    """The request a plain story answers: a verb, a noun and an adjective from it (in that order), and
    `Dialogue` when it quotes speech. Deterministic: the same story always gives the same request."""
    toks = _tokens(story)
    names = _names(toks)
    words = [w.lower() for w, _ in toks]
    vocab = set(words)
    rng = _seed(story, "words")
    verbs = _verb_candidates(words, vocab, names)
    nouns = _noun_candidates(words, names, set(verbs))
    adjectives = sorted({w for w in vocab if _is_adjective(w) and _content(w, names)})
    chosen: list[str] = []
    for group in (verbs, nouns, adjectives):
        group = [w for w in group if w not in chosen]
        if group:
            chosen.append(rng.choice(group))
    rest = sorted({w for w in vocab if _content(w, names) and w not in chosen and not w.endswith(("ed", "ing"))})
    while len(chosen) < 3 and rest:
        chosen.append(rest.pop(rng.randrange(len(rest))))
    return Request(words=tuple(chosen), features=("Dialogue",) if has_dialogue(story) else ())


def request_of(record: dict) -> Request | None:
    """The request of an official shard record (`instruction.words`, `instruction.features`, `summary`), or None
    when it carries none."""
    ins = record.get("instruction")
    ins = ins if isinstance(ins, dict) else {}
    words = tuple(str(w) for w in ins.get("words") or () if str(w).strip())
    features = tuple(str(f) for f in ins.get("features") or () if str(f).strip())
    summary = record.get("summary") if isinstance(record.get("summary"), str) else ""
    req = Request(words=words, features=features, summary=summary.strip())
    return req or None


def request_lines(req: Request) -> str:
    """The request's lines up to and including `Story: ` (what a prompt for a requested story starts with)."""
    lines = []
    if req.words:
        lines.append("Words: " + ", ".join(req.words))
    if req.features:
        lines.append("Features: " + ", ".join(req.features))
    if req.summary:
        lines.append("Summary: " + " ".join(req.summary.split()))
    return "".join(line + "\n" for line in lines) + "Story: "


def render(story: str, req: Request | None) -> str:
    """A training example: the story behind its request, parts left out at random (seeded by the story), and a
    share of stories left plain."""
    req = req if req is not None else derive_request(story)
    rng = _seed(story, "render")
    if rng.random() < PLAIN_SHARE or not req:
        return story
    kept = Request(words=req.words if rng.random() < KEEP["words"] else (),
                   features=req.features if rng.random() < KEEP["features"] else (),
                   summary=req.summary if rng.random() < KEEP["summary"] else "")
    return request_lines(kept) + story


def parse_rendered(text: str) -> tuple[Request, str]:
    """The request and the story of a rendered example (the inverse of `render` / `request_lines` + story)."""
    head, sep, story = text.partition("Story: ")
    if not sep or any(line and not line.startswith(("Words: ", "Features: ", "Summary: "))
                      for line in head.split("\n")):
        return Request(), text
    parts = {k: v for k, _, v in (line.partition(": ") for line in head.split("\n") if line)}
    return Request(words=_listed(parts.get("Words", "")), features=_listed(parts.get("Features", "")),
                   summary=parts.get("Summary", "")), story


def _listed(line: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in line.split(",") if x.strip())


def word_forms(word: str) -> set[str]:
    """A word and its inflections (regular suffixes and the irregular list): hang -> hangs, hung, hanging, ..."""
    w = word.lower()
    forms = {w, w + "s", w + "es", w + "ed", w + "d", w + "ing", w + "er", w + "est"}
    if w.endswith("e"):
        forms |= {w[:-1] + "ing", w[:-1] + "er", w[:-1] + "est"}
    if w.endswith("y") and len(w) > 2 and w[-2] not in "aeiou":
        forms |= {w[:-1] + "ies", w[:-1] + "ied", w[:-1] + "ier", w[:-1] + "iest"}
    if len(w) >= 3 and w[-1] not in "aeiouwxy" and w[-2] in "aeiou" and w[-3] not in "aeiou":
        forms |= {w + w[-1] + "ed", w + w[-1] + "ing", w + w[-1] + "er", w + w[-1] + "est"}
    if w.endswith("f"):
        forms.add(w[:-1] + "ves")
    forms |= set(IRREGULAR.get(w, "").split())
    for base, others in IRREGULAR.items():  # a requested past form counts its base too
        if w in others.split():
            forms |= {base, *others.split()}
    return forms


def contains_word(story: str, word: str) -> bool:
    """Whether the story uses the word or one of its inflections (whole words, any case)."""
    forms = word_forms(word)
    return any(t.lower() in forms for t in _WORD.findall(story))


def requests_met(story: str, req: Request) -> int:
    """How many of the request's checkable asks the story meets: each requested word present, and a quotation
    when it asks for Dialogue (the other features cannot be checked in text)."""
    met = sum(contains_word(story, w) for w in req.words)
    return met + ("Dialogue" in req.features and has_dialogue(story))


def ask(fmt: str, words=(), features=(), summary: str = "", where: str = "this checkpoint") -> Request | None:
    """The request a user asks for (None when nothing is asked), checked against the model's text format:
    a model trained on plain stories cannot follow one. Errors are one-line UserErrors."""
    from tinystories.core.errors import UserError

    try:
        req = Request(words=normalize_words(words), features=normalize_features(features),
                      summary=" ".join((summary or "").split()))
    except ValueError as e:
        raise UserError(str(e)) from None
    if not req:
        return None
    if fmt != "instruct":
        raise UserError(f"{where} was trained on plain stories (data.format={fmt}), not on requests: it cannot take "
                        f"words, features or a summary; train one with `tinystories quickstart --instruct` or "
                        f"--set data.format=instruct, or give only a prompt")
    return req


class RequestTokens:
    """Which tokens of a packed token stream are request lines: the tokens after a rendered example's start-of-story
    token, up to and including its `Story:`. Training with train.loss_on=story gives these tokens no loss, so the
    model is taught to write the story it is asked for, not to write requests. The start token itself stays scored:
    predicting it is how the model learns to end the story before it.

    Works on any stretch of the stream: a window that starts inside a request is told so by the LOOKBACK tokens
    before it (a request is a few dozen tokens), and its last tokens by the `lookahead` after it (a request's first
    line is told by its whole head, `Words:`). Checked once against a rendered example, so a tokenizer that
    splits the `Story:` marker differently in context is refused instead of silently masking the wrong tokens."""

    LOOKBACK = 512

    def __init__(self, tok):
        import numpy as np

        from tinystories.core.errors import UserError

        self.start = tok.doc_start_id
        self.marker = np.array(tok.encode("Story:"), dtype=np.int64)
        pieces = [tok.decode([i]) for i in range(tok.vocab_size)]
        self.newline = np.array(["\n" in p for p in pieces])  # tokens that end a request line
        self.wordlike = np.array([any(c.isalpha() for c in p) for p in pieces])  # not the ", " between words
        self.heads = [np.array(tok.encode(h), dtype=np.int64) for h in ("Words:", "Features:", "Summary:", "Story:")]
        self.lookahead = max(len(h) for h in self.heads)
        head = request_lines(Request(words=("jump", "ball", "red"), features=("Dialogue",), summary="A ball."))
        example = np.array([self.start, *tok.encode(head + "Once upon a time.")], dtype=np.int64)
        expected = len(tok.encode(head.removesuffix(" ")))
        if int(self(example).sum()) != expected:
            raise UserError(f"train.loss_on=story: the tokenizer {getattr(tok, 'path', '')} does not keep `Story:` "
                            f"as the same tokens inside a request; use train.loss_on=all")

    def __call__(self, ids):
        """A bool array as long as `ids`: True where the token belongs to a request's lines."""
        import numpy as np

        ids = np.asarray(ids, dtype=np.int64)
        n, idx = len(ids), np.arange(len(ids))
        ends = np.zeros(n, dtype=bool)  # the last token of each `Story:` marker
        hit = _occurs(ids, self.marker)
        ends[len(self.marker) - 1 :] = hit
        starts = ids == self.start
        opens = np.zeros(n, dtype=bool)  # a document that begins with a request line
        for head in self.heads:
            k = n - len(head)  # the start tokens with a whole head after them in `ids`
            if k > 0:
                opens[:k] |= starts[:k] & _occurs(ids[1:], head)
        last_start = np.maximum.accumulate(np.where(starts, idx, -1))
        last_open = np.maximum.accumulate(np.where(opens, idx, -1))
        # the last marker end strictly before each position: the marker itself still belongs to the request
        last_end = np.maximum.accumulate(np.where(ends, idx, -1))
        last_end = np.concatenate([[-1], last_end[:-1]])
        return (last_start >= 0) & (last_open == last_start) & (last_end < last_start) & ~starts

    def requested_words(self, ids, request=None):
        """A bool array as long as `ids`: True at each story token that is the first in its story to repeat a token
        of its request's `Words:` line: where the story writes a requested word (as the request spells it) for the
        first time, the one place where the request, not the story so far, tells what comes. Stories whose start
        lies before `ids` are left out (their request is not in sight). `request`: self(ids), if already known."""
        import numpy as np

        ids = np.asarray(ids, dtype=np.int64)
        words_head = self.heads[0]  # `Words:`
        n, h = len(ids), len(words_head)
        request = self(ids) if request is None else request
        out = np.zeros(n, dtype=bool)
        bounds = [*np.flatnonzero(ids == self.start).tolist(), n]
        for a, b in zip(bounds, bounds[1:]):
            if b - a <= h + 1 or not (ids[a + 1 : a + 1 + h] == words_head).all():
                continue
            line = ids[a + 1 + h : b]
            ends = np.flatnonzero(self.newline[line])
            line = line[: ends[0]] if len(ends) else line
            words = line[self.wordlike[line]]
            story = a + 1 + np.flatnonzero(~request[a + 1 : b])
            hits = story[np.isin(ids[story], words)]
            _, first = np.unique(ids[hits], return_index=True)
            out[hits[first]] = True
        return out


def _occurs(ids, seq):
    """Bool array over the positions where `seq` can start in `ids` (len(ids) - len(seq) + 1 of them, or none)."""
    import numpy as np

    if len(ids) < len(seq):
        return np.zeros(0, dtype=bool)
    return (np.lib.stride_tricks.sliding_window_view(ids, len(seq)) == seq).all(axis=1)
