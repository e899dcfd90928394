"""One sampling function for the CLI, evaluation and the web server: incremental decoding with a KV cache.

`sample()` yields one `Step` per generated position for a batch of equal-length prompts. Greedy when
temperature is 0; top-k, top-p and a repetition penalty that divides positive logits and multiplies negative
ones (the seed project divided both, which *raises* a repeated token with a negative logit). A sequence that
outgrows the context keeps going: the cache is rebuilt from the most recent tokens (sliding window).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from tinystories.core.errors import UserError
from tinystories.data.tokenizer import TextTokenizer
from tinystories.inference.params import (  # noqa: F401 (SamplingParams and the flags: imported from here too)
    SAMPLING_LIMITS,
    SamplingParams,
    add_sampling_args,
    sampling_params,
)
from tinystories.model.transformer import Transformer


@dataclass
class Step:
    tokens: torch.Tensor  # (B,) the token chosen at this position (only meaningful where not finished)
    finished: torch.Tensor  # (B,) bool: this sequence had already stopped before this step
    top_ids: torch.Tensor | None = None  # (B, k) most likely alternatives, when asked for
    top_probs: torch.Tensor | None = None  # (B, k) their probabilities (after temperature)
    logprobs: torch.Tensor | None = None  # (B,) log-probability of `tokens` under the model alone (no bias), when asked


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """logits (B, V); seen (B, V) bool. Positive logits of seen tokens are divided, negative multiplied."""
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def filter_logits(logits: torch.Tensor, top_k: int | None, top_p: float | None) -> torch.Tensor:
    if top_k and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, idx = torch.sort(logits, descending=True, dim=-1)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        drop = cum - torch.softmax(sorted_logits, dim=-1) > top_p  # keep the token that crosses top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, idx, sorted_logits)
    return logits


class WordBias:
    """A per-row logits processor that steers a story toward requested words it has not used yet.

    Each step it adds `strength` (ramped up over the first `ramp` tokens, so that the story can start naturally)
    to the first token of each word still missing (" dragon", " Dragon"), and `complete` to the next token of a
    word whose first tokens were just written (" dr" -> "agon"). A word stops being pushed as soon as its tokens are
    written or the story holds an inflection of it (data/requests.contains_word): the bias fades word by word.
    `dialogue` (the request asks for it): the tokens that open a quotation get the same ramped bonus until the story
    holds a quotation mark. `plausible` > 0: a word's first token is pushed only where the model already ranks it
    among its `plausible` likeliest next tokens, so that words land where they can fit the sentence."""

    def __init__(self, tok: TextTokenizer, words, strength: float = 4.0, complete: float = 8.0, ramp: int = 24,
                 dialogue: bool = False, plausible: int = 0):
        self.strength, self.complete, self.ramp, self.plausible = strength, complete, ramp, plausible
        self.tok = tok
        self.pending = {w: [ids for ids in (tok.encode(" " + f) for f in (w.lower(), w.capitalize())) if ids]
                        for w in dict.fromkeys(words)}
        self.quote = sorted({ids[0] for ids in (tok.encode(q) for q in (' "', '"')) if ids}) if dialogue else []
        self.ids: list[int] = []
        self.offered: dict[int, float] = {}  # the last bonuses given (bias())
        self.pushed: list[int] = []  # the positions whose token had a bonus: where the bias wrote

    def __bool__(self) -> bool:
        return bool(self.pending or self.quote)

    def bias(self, logits: torch.Tensor) -> dict[int, float]:
        """{token id: logit bonus} for the next position, given the row's logits (V,). Mid-word (a requested word's
        first tokens were just written) only its next token is pushed; otherwise the first token of each missing
        word, where the model ranks it among its `plausible` likeliest (when set), and an opening quotation."""
        done = {}
        for variants in self.pending.values():
            for seq in variants:
                for k in range(min(len(seq) - 1, len(self.ids)), 0, -1):  # a word begun: complete it
                    if self.ids[-k:] == seq[:k]:
                        done[seq[k]] = self.complete
                        break
        if done:
            self.offered = done
            return done
        vocab_size = logits.size(-1)
        floor = float(logits.topk(self.plausible).values[-1]) if 0 < self.plausible < vocab_size else None
        push = self.strength * (min(1.0, (len(self.ids) + 1) / self.ramp) if self.ramp else 1.0)
        firsts = {seq[0] for variants in self.pending.values() for seq in variants if seq[0] < vocab_size}
        out = {t: push for t in firsts if floor is None or float(logits[t]) >= floor}
        self.offered = out | {t: push for t in self.quote if t < vocab_size}
        return self.offered

    def push(self, token: int) -> None:
        """The token the row got; words the story now holds stop being pushed."""
        from tinystories.data.requests import contains_word

        if token in self.offered:
            self.pushed.append(len(self.ids))
        self.offered = {}
        self.ids.append(token)
        if self.quote and '"' in self.tok.decode([token]):
            self.quote = []
        if not self.pending:
            return
        tail = self.tok.decode(self.ids[-24:])
        for w in [w for w, variants in self.pending.items()
                  if contains_word(tail, w) or any(self.ids[-len(seq):] == seq for seq in variants)]:
            del self.pending[w]


def request_bias(tok: TextTokenizer, request, strength: float, candidates: int = 1) -> WordBias | None:
    """Decoding's bias for a Request (data/requests.py): its words, and a quotation when it asks for Dialogue;
    None when the request is empty, steers nothing, or `strength` (--word-bias) is off. When the best of several
    `candidates` is kept, a word is pushed only where it is plausible (data/requests.BIAS_RANK): the choice among
    the candidates makes up the words this leaves out; a single story is pushed wherever a word is missing."""
    from tinystories.data.requests import BIAS_RANK

    dialogue = bool(request) and "Dialogue" in request.features
    if not request or strength <= 0 or not (request.words or dialogue):
        return None
    return WordBias(tok, request.words, strength, dialogue=dialogue, plausible=BIAS_RANK if candidates > 1 else 0)


def apply_word_bias(logits: torch.Tensor, biases: list[WordBias | None]) -> torch.Tensor:
    """logits (B, V) plus each row's WordBias (None: that row is left alone)."""
    if not any(biases):
        return logits
    logits = logits.float().clone()
    for b, wb in enumerate(biases):
        if wb:
            for t, v in wb.bias(logits[b]).items():
                logits[b, t] += v
    return logits


def push_biases(biases: list[WordBias | None] | None, tokens: torch.Tensor) -> None:
    """Give each row's WordBias the token the row got."""
    for b, wb in enumerate(biases or ()):
        if wb is not None:
            wb.push(int(tokens[b]))


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """(B,) log-probability of each row's token under its logits (B, V): the model alone, before any bias."""
    return torch.log_softmax(logits.float(), -1).gather(1, tokens[:, None])[:, 0]


def next_tokens(
    logits: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator | list[torch.Generator],
    seen: torch.Tensor,
    top_alternatives: int = 0,
    biases: list[WordBias | None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The next token of each row from its logits (B, V): requested-word bias, repetition penalty, temperature,
    top-k, top-p, then a draw from `generator` (one for the batch, as `sample` does, or one per row: the server's
    requests each keep their own seed). Returns (tokens (B,), top_ids, top_probs) with the alternatives when
    asked."""
    if biases:
        logits = apply_word_bias(logits, biases)
    logits = apply_repetition_penalty(logits.float(), seen, params.repetition_penalty)
    top_ids = top_probs = None
    if params.temperature == 0:
        nxt = logits.argmax(dim=-1)
        scaled = logits
    else:
        scaled = logits / params.temperature
        probs = torch.softmax(filter_logits(scaled, params.top_k, params.top_p), dim=-1)
        if isinstance(generator, torch.Generator):
            nxt = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        else:  # one generator per row: the draw torch.multinomial(probs[b:b+1], 1, generator=g) makes (for one
            # sample it divides by exponential noise and takes the argmax), with only the noise drawn row by row
            noise = torch.empty_like(probs)
            for b, g in enumerate(generator):
                noise[b].exponential_(1, generator=g)
            nxt = (probs / noise).argmax(dim=-1)
    if top_alternatives:
        top_probs, top_ids = torch.softmax(scaled, dim=-1).topk(top_alternatives, dim=-1)
    return nxt, top_ids, top_probs


@torch.inference_mode()
def sample(
    model: Transformer,
    prompts: list[list[int]],
    params: SamplingParams,
    stop_ids: frozenset[int] | set[int] = frozenset(),
    use_cache: bool = True,
    top_alternatives: int = 0,
    should_stop: Callable[[], bool] | None = None,
    biases: list[WordBias | None] | None = None,
    logprobs: bool = False,
) -> Iterator[Step]:
    """Up to params.max_new_tokens tokens after each prompt (all the same length); `biases`: a WordBias (or None)
    per row; `logprobs`: Steps carry the tokens' log-probabilities before bias, penalty and temperature."""
    cfg, device, ctx = model.cfg, model.rope.device, model.cfg.max_seq_len
    if len({len(p) for p in prompts}) != 1 or not prompts[0]:
        raise ValueError("prompts must be non-empty and of equal length")
    seq = torch.tensor(prompts, dtype=torch.long, device=device)
    if seq.size(1) > ctx:
        raise UserError(f"the prompt is {seq.size(1)} tokens, longer than the model's context of {ctx} tokens")
    B = seq.size(0)
    gen = torch.Generator(device=device)
    gen.manual_seed(params.seed) if params.seed is not None else gen.seed()
    seen = torch.zeros(B, cfg.vocab_size, dtype=torch.bool, device=device)
    if params.repetition_penalty != 1.0:
        seen.scatter_(1, seq, True)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    stop = torch.tensor(sorted(stop_ids), dtype=torch.long, device=device) if stop_ids else None
    keep = max(1, ctx - ctx // 4)  # tokens kept when the window slides

    n = seq.size(1)
    ids = torch.cat([seq, seq.new_empty(B, params.max_new_tokens)], dim=1)  # every token so far
    cache = model.new_cache(B) if use_cache else None
    logits = model.decode(seq, cache, last_only=True) if use_cache else model(seq, last_only=True)[0]
    logits = logits[:, -1, :]
    for _ in range(params.max_new_tokens):
        if should_stop is not None and should_stop():
            return
        nxt, top_ids, top_probs = next_tokens(logits, params, gen, seen, top_alternatives, biases)
        push_biases(biases, nxt)
        lp = token_logprobs(logits, nxt) if logprobs else None
        if stop is None:  # no row can finish: every step shares the one all-False `finished`
            yield Step(nxt, finished, top_ids, top_probs, lp)
        else:
            yield Step(nxt, finished.clone(), top_ids, top_probs, lp)
            finished |= torch.isin(nxt, stop)
            if bool(finished.all()):
                return
        if params.repetition_penalty != 1.0:
            seen.scatter_(1, nxt[:, None], True)
        ids[:, n] = nxt
        n += 1
        if not use_cache:
            logits, _ = model(ids[:, max(0, n - ctx) : n], last_only=True)
        elif cache.length + 1 > ctx:  # slide: rebuild the cache from the last `keep` tokens
            cache.length = 0
            logits = model.decode(ids[:, n - keep : n], cache, last_only=True)
        else:
            logits = model.decode(nxt[:, None], cache)
        logits = logits[:, -1, :]


def compile_decoding_now(model: Transformer, start_id: int, log: Callable[[str], None],
                         warm_up: Callable[[], None] | None = None) -> None:
    """Compile the one-token step (model/exported_step.compile_for_decoding) and run it at once, with `warm_up()` or a
    3-token greedy sample, so that the seconds of compiling are spent (and reported) up front instead of inside the
    first story or request."""
    import time

    from tinystories.model.exported_step import compile_for_decoding

    t0 = time.perf_counter()
    log("compiling the decoding step...")
    how = compile_for_decoding(model, log)
    if warm_up is not None:
        warm_up()
    else:
        for _ in sample(model, [[start_id]], SamplingParams(max_new_tokens=3, temperature=0.0)):
            pass
    if model.decoding_is_compiled:  # else decode() printed why and stays eager
        log(f"compiled in {time.perf_counter() - t0:.1f}s, {how}")


class StreamDecoder:
    """Turns a growing list of token ids into text pieces, never splitting a multi-byte UTF-8 character.

    Each push decodes only a short window (the few tokens before the text not yet emitted, as Hugging Face
    TGI does), so a long story costs the same per token as a short one; the pieces join to the decoding of
    the whole continuation (SentencePiece's leading space included, since the window starts in the prefix)."""

    WINDOW = 6  # tokens of already-emitted context decoded with the new ones

    def __init__(self, tok: TextTokenizer, prefix_ids: list[int] | None = None):
        self.tok = tok
        self.all = list(prefix_ids or [])
        self.read = len(self.all)  # tokens before this index are emitted
        self.start = max(0, self.read - self.WINDOW)  # the window's context starts here

    def push(self, token: int) -> str:
        self.all.append(token)
        before = self.tok.decode(self.all[self.start : self.read])
        text = self.tok.decode(self.all[self.start :])
        if len(text) <= len(before) or text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait
            return ""
        self.read = len(self.all)
        self.start = max(0, self.read - self.WINDOW)
        return text[len(before):]


def prompt_ids(tok: TextTokenizer, prompt: str) -> list[int]:
    """A prompt as the model saw stories in training: the start-of-story token, then the text."""
    return [tok.doc_start_id] + (tok.encode(prompt) if prompt else [])


def generate_texts(
    model: Transformer, tok: TextTokenizer, prompt: str, params: SamplingParams, num_samples: int = 1,
    request=None, word_bias: float = 0.0, candidates: int = 1,
) -> list[dict]:
    """Sample `num_samples` continuations of `prompt` as text (batched). Returns text and whether each ended.
    `request` (data/requests.Request) with `word_bias` > 0: each row steered toward its words (request_bias).
    `candidates` > 1 with a request: each story is the best of that many drawn together (pick_candidate)."""
    ids = prompt_ids(tok, prompt)
    k = candidates if request and candidates > 1 else 1
    rows = num_samples * k
    outs: list[list[int]] = [[] for _ in range(rows)]
    ended = [False] * rows
    logp: list[list[float]] = [[] for _ in range(rows)]
    biases = [request_bias(tok, request, word_bias, k) for _ in range(rows)]
    biases = biases if any(biases) else None
    for step in sample(model, [ids] * rows, params, tok.stop_ids, biases=biases, logprobs=k > 1):
        for b in range(rows):
            if step.finished[b]:
                continue
            t = int(step.tokens[b])
            if k > 1:
                logp[b].append(float(step.logprobs[b]))
            if t in tok.stop_ids:
                ended[b] = True
            else:
                outs[b].append(t)
    stories = [{"prompt": prompt, "text": prompt + decode_continuation(tok, ids, o), "tokens": len(o), "ended": e,
                "logprob": naturalness(lp, biases[b].pushed if biases and biases[b] is not None else [])}
               for b, (o, e, lp) in enumerate(zip(outs, ended, logp))]
    return [pick_candidate(stories[i * k : (i + 1) * k], request) for i in range(num_samples)] if k > 1 else stories


def naturalness(logprobs: list[float], pushed: list[int]) -> float:
    """How naturally a story reads to the model without the bias: its mean log-probability per token, plus the mean
    over the tokens the bias wrote and the data/requests.AFTER_PUSH tokens after each (0 when it wrote none), so
    that a word forced where it does not fit, and the text that has to follow it, count (AFTER_PUSH < 0: the mean
    alone, for comparison)."""
    from tinystories.data import requests

    if not logprobs:
        return 0.0
    mean = sum(logprobs) / len(logprobs)
    if requests.AFTER_PUSH < 0:
        return mean
    near = sorted({j for i in pushed for j in range(i, i + requests.AFTER_PUSH + 1) if j < len(logprobs)})
    at = [logprobs[j] for j in near]
    return mean + (sum(at) / len(at) if at else 0.0)


def pick_candidate(stories: list[dict], request) -> dict:
    """The story that meets most of the request (data/requests.requests_met); among those, the one whose "logprob"
    (generate_texts: its `naturalness`) is highest, i.e. where the requested words sit most naturally."""
    from tinystories.data.requests import parse_rendered, requests_met

    def key(s: dict) -> tuple:
        return requests_met(parse_rendered(s["text"])[1], request), s["logprob"]

    best = max(stories, key=key)
    return {k: v for k, v in best.items() if k != "logprob"}


def decode_continuation(tok: TextTokenizer, prefix: list[int], ids: list[int]) -> str:
    """Decode `ids` as the continuation of `prefix` (keeps SentencePiece's leading spaces right)."""
    prefix_text = tok.decode(prefix)
    return tok.decode(prefix + ids)[len(prefix_text):]
