"""The stories `eval` and `doctor` compare: real ones (a text file, or the run's validation split), the training
vocabulary (for invented words), the prompts (the fixed openings, or the beginnings of held-out stories as in the
TinyStories paper) and the generated stories, sampled through the one shared sampling function
(`sampling.generate_texts`) with a seed per prompt, so two checkpoints are compared on the same prompts.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tinystories.core.defaults import OPENINGS
from tinystories.core.errors import UserError

REFERENCE_STORIES = 300
TRAIN_VOCAB_BYTES = 100 << 20  # read at most this much training text for the vocabulary
TRAIN_VOCAB_TOKENS = 20_000_000  # or decode at most this many cached training tokens
PROMPT_MIN_WORDS = 8  # a first sentence shorter than this takes the second one with it


# ------------------------------------------------------------------------------------------------ real stories


def split_long_documents(docs: list[str]) -> list[str]:
    """A file of one paragraph per line is read as one huge document: use its lines as stories instead."""
    from tinystories.data.text import is_line_per_story

    out: list[str] = []
    for d in docs:
        if is_line_per_story(d):
            out.extend(line.strip() for line in d.splitlines() if line.strip())
        else:
            out.append(d)
    return out


def read_documents(path: str | Path, flag: str | None = None) -> list[str]:
    """The documents of a text file or directory.

    `flag` (e.g. "--reference") is the option that named it, for errors."""
    from tinystories.data.text import iter_documents, list_text_files

    if not Path(path).exists():
        raise UserError(f"{flag + ' ' if flag else ''}{path}: no such file or directory")
    return list(iter_documents(list_text_files(path, flag or "the path")))


def open_run_cache(state: dict):
    """The token cache the run trained on (state.json's cache_dir), or None."""
    from tinystories.data.cache import TokenCache

    cache_dir = state.get("cache_dir")
    if not cache_dir or not (Path(cache_dir) / "manifest.json").is_file():
        return None
    return TokenCache.open(cache_dir)


def decode_docs(tok, split, limit: int) -> list[str]:
    """The first `limit` documents of a cache split, decoded."""
    stream = split.stream()
    offsets = list(split.docs[: limit + 1, 0]) + ([len(stream)] if len(split.docs) <= limit else [])
    return [tok.decode(np.asarray(stream[a + 1 : b], dtype=np.int64).tolist()) for a, b in zip(offsets, offsets[1:])]


def reference_stories(tok, cache, reference: str | None, text: str | None) -> tuple[list[str], str]:
    """Real stories to compare with: --reference, else the cache's validation split, else --text."""
    if reference:
        return split_long_documents(read_documents(reference, "--reference"))[:REFERENCE_STORIES], str(reference)
    if cache is not None and cache.manifest["splits"]["val"]["tokens"]:
        docs = split_long_documents(decode_docs(tok, cache.split("val"), REFERENCE_STORIES))[:REFERENCE_STORIES]
        return docs, f"{cache.path} (validation split, the first {len(docs):,} stories)"
    if text:
        return split_long_documents(read_documents(text, "--text"))[:REFERENCE_STORIES], str(text)
    return [], "none (pass --reference FILE)"


# ------------------------------------------------------------------------------------------------ training vocabulary


def train_vocabulary(tok, cache, train_text: str | None) -> tuple[set[str] | None, str]:
    """Lower-cased words of the training text: --train-text, else the cache's train sources, else its decoded tokens.
    The second value says where they came from, and how much of it was read when the text was cut short."""
    from tinystories.evaluation.story_stats import vocabulary

    if train_text:
        return vocabulary(read_documents(train_text, "--train-text")), str(train_text)
    if cache is None:
        return None, "no training text (pass --train-text FILE)"
    sources = [Path(s["path"]) for s in cache.manifest.get("sources", []) if s.get("split", "train") == "train"]
    if sources and all(p.is_file() for p in sources):
        from tinystories.data.text import iter_documents

        read = [0]

        def capped():
            for d in iter_documents(sources):
                yield d
                read[0] += len(d)
                if read[0] >= TRAIN_VOCAB_BYTES:
                    return

        words = vocabulary(capped())
        sample = f"the first {read[0] / 1e6:,.0f} MB of " if read[0] >= TRAIN_VOCAB_BYTES else ""
        return words, sample + ", ".join(str(p) for p in sources)
    split = cache.split("train")
    stream = split.stream()[:TRAIN_VOCAB_TOKENS]
    vocab: set[str] = set()
    step = 1_000_000
    for i in range(0, len(stream), step):  # chunks: words cut at a chunk edge are rare and harmless
        vocab |= vocabulary([tok.decode(np.asarray(stream[i : i + step], dtype=np.int64).tolist())])
    return vocab, f"{cache.path} (train split, the first {len(stream):,} tokens decoded)"


# ------------------------------------------------------------------------------------------------ prompts and samples


def held_out_prompts(stories: list[str], n: int) -> list[str]:
    """Beginnings of real held-out stories as prompts, as in the TinyStories paper: a story's first sentence, or its
    first two when the first has fewer than PROMPT_MIN_WORDS words. Stories with fewer than three sentences (little
    left to complete) or a first sentence that is not "Capital ... end." of at least 3 words (a paragraph that starts
    mid-story: "Spot.") are passed over. At most `n`."""
    from tinystories.evaluation.story_stats import sentences, well_formed, words

    out: list[str] = []
    for story in stories:
        ss = sentences(story)
        if len(ss) < 3 or not well_formed(ss[0]) or len(words(ss[0])) < 3:
            continue
        k = 2 if len(words(ss[0])) < PROMPT_MIN_WORDS else 1
        out.append(" ".join(ss[:k]))
        if len(out) == n:
            break
    return out


def generate_stories(model, tok, n: int, params, prompts: list[str] | None = None) -> list[dict]:
    """`n` stories from `prompts` (default: the fixed openings), spread evenly over them in order (the first ones
    take the remainder), seeded per prompt."""
    from dataclasses import replace

    from tinystories.inference.sampling import generate_texts

    prompts = prompts or OPENINGS
    counts = [n // len(prompts) + (1 if i < n % len(prompts) else 0) for i in range(len(prompts))]
    out: list[dict] = []
    for i, (prompt, k) in enumerate(zip(prompts, counts)):
        if k:
            seed = None if params.seed is None else params.seed + i
            out.extend(generate_texts(model, tok, prompt, replace(params, seed=seed), k))
    return out
