"""Likelihood of text under a model: loss per token, perplexity and bits per byte.

bits per byte = total nats / ln 2 / UTF-8 bytes of the text. It does not depend on the tokenizer, so it
compares a 512-token, a 10K and a 32K vocabulary fairly. Text is scored as the model saw stories in
training: each document starts with the tokenizer's start-of-story token; the stream is cut into
non-overlapping windows of the model's context (each token is predicted exactly once, from the tokens
before it in its window).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from tinystories.data.tokenizer import TextTokenizer
from tinystories.model.transformer import Transformer


def encode_documents(tok: TextTokenizer, docs: list[str]) -> tuple[np.ndarray, int]:
    """The token stream `<start> doc <start> doc ...` and the UTF-8 byte count of the documents."""
    parts: list[int] = []
    for ids in tok.encode_batch(docs):
        parts.append(tok.doc_start_id)
        parts.extend(ids)
    return np.asarray(parts, dtype=np.int64), sum(len(d.encode("utf-8")) for d in docs)


def cut_split(split, tok: TextTokenizer, max_tokens: int | None, skip_tokens: int = 0) -> tuple[np.ndarray, int]:
    """The text a likelihood of a token-cache split (cache.Split) scores, as (stream, UTF-8 bytes): its first
    `max_tokens` predicted tokens, i.e. max_tokens + 1 tokens of the stream (which starts with a story's start
    token), or the whole split when it is not longer (or max_tokens is None). The one cut of the validation text:
    a training run's evaluations (train.eval_tokens) and `eval --max-tokens N` both score it, so "the final eval"
    and `eval --max-tokens N` of the same checkpoint are the same number. The bytes are exact for whole stories
    (the story index); the story the cut ends in counts the bytes of its decoded tokens up to the cut.

    `skip_tokens` N scores what follows the first N predicted tokens instead (the text after a run's evaluation
    subset, which chose its best checkpoint): the stream from token N on, whose first token is context only, and
    the bytes of the longer cut less those of the first; empty when the split is not longer."""
    if skip_tokens:
        if len(split.stream()) <= skip_tokens + 1:
            return np.zeros(0, dtype=np.int64), 0
        whole, whole_bytes = cut_split(split, tok, None if max_tokens is None else skip_tokens + max_tokens)
        return whole[skip_tokens:], whole_bytes - cut_split(split, tok, skip_tokens)[1]
    stream = split.stream()
    if max_tokens is None or len(stream) <= max_tokens + 1:
        return np.asarray(stream, dtype=np.int64), int(split.bytes)
    end = max_tokens + 1
    cut = np.asarray(stream[:end], dtype=np.int64)
    starts, sizes = split.docs[:, 0], split.docs[:, 1]
    k = int(np.searchsorted(starts, end, side="left"))  # stories 0..k-1 start before the cut
    if k < len(starts) and int(starts[k]) == end:
        return cut, int(np.sum(sizes[:k]))  # the cut falls on a story boundary: whole stories
    part = cut[int(starts[k - 1]) + 1 :]  # the story the cut ends in, without its start token
    return cut, int(np.sum(sizes[: k - 1])) + len(tok.decode(part.tolist()).encode("utf-8"))


@torch.inference_mode()
def likelihood(
    model: Transformer,
    stream: np.ndarray,
    n_bytes: int,
    window: int | None = None,
    batch_size: int = 16,
    autocast=None,
    rank: int = 0,
    world: int = 1,
    progress=None,
) -> dict:
    """Score every token of `stream` after the first; `n_bytes` is the text's UTF-8 size for bits per byte.

    With world > 1 this process scores only every world-th window (its share); sum `nats` and `tokens`
    over the processes for the total. `progress(done, total)`, if given, is called after each batch."""
    window = window or model.cfg.max_seq_len
    device = model.rope.device
    tokens = torch.as_tensor(np.asarray(stream, dtype=np.int64))
    n = len(tokens) - 1  # predicted tokens
    starts = list(range(0, n, window))[rank::world]
    total_nats = 0.0
    was_training = model.training
    model.eval()
    for i in range(0, len(starts), batch_size):
        chunk = starts[i : i + batch_size]
        width = min(window, n - chunk[0])
        x = torch.zeros(len(chunk), width, dtype=torch.long)
        y = torch.full((len(chunk), width), -1, dtype=torch.long)
        for r, s in enumerate(chunk):
            e = min(s + window, n)
            x[r, : e - s] = tokens[s:e]
            y[r, : e - s] = tokens[s + 1 : e + 1]
        x, y = x.to(device), y.to(device)
        if autocast is not None:
            with autocast:
                _, loss = model(x, y, reduction="none")
        else:
            _, loss = model(x, y, reduction="none")
        total_nats += float(loss.double().sum())  # ignored positions contribute 0
        if progress is not None:  # progress(tokens scored, tokens to score) after each batch
            progress(min(n, (chunk[-1] + window) if world == 1 else n * (i + len(chunk)) // len(starts)), n)
    model.train(was_training)
    if world > 1:
        n = sum(min(window, len(tokens) - 1 - s) for s in starts)
    loss = total_nats / max(n, 1)
    return {
        "nats": total_nats,
        "loss_per_token": loss,
        "perplexity": math.exp(min(loss, 50.0)),
        "bits_per_byte": total_nats / math.log(2) / max(n_bytes, 1),
        "tokens": n,
        "bytes": n_bytes,
    }
