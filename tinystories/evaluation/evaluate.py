"""`tinystories eval`: likelihood (loss, perplexity, bits per byte) on any text or the run's validation split,
statistics of generated stories next to the same statistics of real stories, and an optional LLM judge.

Stories are sampled from a fixed list of classic openings with a fixed seed through the one shared sampling
function (`sampling.generate_texts`), so two checkpoints are compared on the same prompts. The judge speaks the
OpenAI chat-completions protocol (`POST {url}/v1/chat/completions`) and grades each completion with the
TinyStories paper's rubric: grammar, creativity, consistency with the beginning, plot (1-10 each).
"""

from __future__ import annotations

import http.client
import json
import math
import os
import re
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

from tinystories.core.defaults import DEFAULT_STORIES
from tinystories.core.errors import UserError

OPENINGS = [
    "Once upon a time",
    "One day,",
    "Lily and Ben",
    "There was a little dog",
    "Once upon a time, there was a little girl named",
    "Tom had a big red ball.",
    "The sun was shining and",
    "Mom said,",
    "In a small house in the woods,",
    "Sam wanted to",
]
REFERENCE_STORIES = 300
TRAIN_VOCAB_BYTES = 100 << 20  # read at most this much training text for the vocabulary
TRAIN_VOCAB_TOKENS = 20_000_000  # or decode at most this many cached training tokens
PROGRESS_TOKENS = 100_000  # scoring a longer text shows progress (tokens/s, ETA) on stderr (issue 13)
LONG_DOC = 20000  # a "document" longer than this with several lines is a one-paragraph-per-line file
JUDGE_RUBRIC = ("grammar", "creativity", "consistency", "plot")
JUDGE_RETRIES = 2


# ------------------------------------------------------------------------------------------------ text


def split_long_documents(docs: list[str]) -> list[str]:
    """A file of one paragraph per line is read as one huge document: use its lines as stories instead."""
    out: list[str] = []
    for d in docs:
        if len(d) > LONG_DOC and "\n" in d:
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


def cut_stream(tok, split, max_tokens: int | None) -> tuple[np.ndarray, int]:
    """The split's first `max_tokens` predicted tokens and the UTF-8 bytes of that text: likelihood.cut_split, the
    cut a training run's validation (train.eval_tokens) scores too."""
    from tinystories.model.likelihood import cut_split

    return cut_split(split, tok, max_tokens)


def train_vocabulary(tok, cache, train_text: str | None) -> tuple[set[str] | None, str]:
    """Lower-cased words of the training text: --train-text, else the cache's train sources, else its decoded tokens."""
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
        sample = f"the first {read[0] / 1e6:,.0f} MB of " if read[0] >= TRAIN_VOCAB_BYTES else ""  # issue 13: stated
        return words, sample + ", ".join(str(p) for p in sources)
    split = cache.split("train")
    stream = split.stream()[:TRAIN_VOCAB_TOKENS]
    vocab: set[str] = set()
    step = 1_000_000
    for i in range(0, len(stream), step):  # chunks: words cut at a chunk edge are rare and harmless
        vocab |= vocabulary([tok.decode(np.asarray(stream[i : i + step], dtype=np.int64).tolist())])
    return vocab, f"{cache.path} (train split, the first {len(stream):,} tokens decoded)"


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


# ------------------------------------------------------------------------------------------------ generation


def generate_stories(model, tok, n: int, params, prompts: list[str] | None = None) -> list[dict]:
    """`n` stories from `prompts` (default: the fixed openings; story i uses prompt i mod len), seeded per prompt."""
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


# --- held-out prompts (issue 15) -------------------------------------------------------------------------------
PROMPT_MIN_WORDS = 8  # a first sentence shorter than this takes the second one with it


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
# --- end of held-out prompts --------------------------------------------------------------------------------------


# ------------------------------------------------------------------------------------------------ judge


def judge_messages(prompt: str, story: str) -> list[dict]:
    completion = story[len(prompt):] if story.startswith(prompt) else story
    return [
        {"role": "system", "content": "You are a strict teacher grading short stories written by students."},
        {"role": "user", "content": (
            "In the following exercise, the student is given a beginning of a story. The student needs to complete "
            "it into a full story. The exercise tests the student's language abilities and creativity. The symbol "
            "*** marks the separator between the prescribed beginning and the student's completion:\n\n"
            f"{prompt}***{completion}\n\n"
            "Please provide your general assessment about the part written by the student (the one after the *** "
            "symbol). Is it grammatically correct? Is it consistent with the beginning of the story? Pay special "
            "attention to whether the student manages to complete the sentence which is split in the middle by "
            "the separator ***.\n\n"
            "Now, grade the student's completion in terms of grammar, creativity, consistency with the story's "
            "beginning and whether the plot makes sense, each as an integer from 1 to 10. Reply with JSON only: "
            '{"grammar": G, "creativity": C, "consistency": S, "plot": P}'
        )},
    ]


def _score(value) -> float | None:
    try:
        x = float(str(value).strip().split("/")[0])
    except (TypeError, ValueError):
        return None
    return x if 1.0 <= x <= 10.0 and math.isfinite(x) else None


def _scores_from_obj(obj) -> dict | None:
    if not isinstance(obj, dict):
        return None
    low = {str(k).strip().lower(): v for k, v in obj.items()}
    for key in ("scores", "grades", "grade", "evaluation"):  # {"scores": {...}}
        if isinstance(low.get(key), dict):
            return _scores_from_obj(low[key])
    out = {}
    for k in JUDGE_RUBRIC:
        v = low.get(k)
        if isinstance(v, dict):
            v = v.get("score", v.get("grade"))
        s = _score(v)
        if s is None:
            return None
        out[k] = s
    return out


def _json_candidates(text: str) -> list[str]:
    cands = re.findall(r"```(?:json|JSON)?\s*(.*?)```", text, re.S)
    depth, start = 0, None
    for i, ch in enumerate(text):  # every balanced {...} block, outermost first
        if ch == "{":
            if depth == 0:
                start = i
            depth += 1
        elif ch == "}" and depth:
            depth -= 1
            if depth == 0:
                cands.append(text[start : i + 1])
    return cands + [text]


def parse_judge_reply(text: str) -> dict | None:
    """{grammar, creativity, consistency, plot} (floats in 1..10) from a judge reply, or None if malformed.

    Accepts JSON alone, in a code fence or inside prose, and as a last resort "Grammar: 8/10" lines."""
    if not isinstance(text, str) or not text.strip():
        return None
    for cand in _json_candidates(text):
        try:
            obj = json.loads(cand)
        except (json.JSONDecodeError, ValueError):
            continue
        scores = _scores_from_obj(obj)
        if scores:
            return scores
    found = {}
    for k in JUDGE_RUBRIC:
        m = re.search(rf"\b{k}\b[^0-9\n]{{0,20}}(\d+(?:\.\d+)?)", text, re.I)
        if m and _score(m.group(1)) is not None:
            found[k] = float(m.group(1))
    return found if len(found) == len(JUDGE_RUBRIC) else None


def chat_url(url: str) -> str:
    url = url.rstrip("/")
    if url.endswith("/chat/completions"):
        return url
    if url.endswith("/v1"):
        return url + "/chat/completions"
    return url + "/v1/chat/completions"


class JudgeUnreachable(Exception):
    pass


def _post(url: str, payload: dict, timeout: float) -> str:
    headers = {"Content-Type": "application/json"}
    key = os.environ.get("TINYSTORIES_JUDGE_API_KEY") or os.environ.get("OPENAI_API_KEY")
    if key:
        headers["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(url, data=json.dumps(payload).encode(), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            body = resp.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as e:
        if e.code in (401, 403, 404):
            raise JudgeUnreachable(f"HTTP {e.code} {e.reason} from {url}") from None
        return ""  # 5xx, 429: treat as a malformed reply and retry
    except (http.client.HTTPException, ConnectionResetError):
        return ""  # reached, but it hung up or spoke garbage HTTP: malformed, retry
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        reason = getattr(e, "reason", e)
        raise JudgeUnreachable(f"cannot reach {url} ({reason})") from None
    try:
        return json.loads(body)["choices"][0]["message"]["content"]
    except (json.JSONDecodeError, KeyError, IndexError, TypeError):
        return body


def judge_stories(samples: list[dict], url: str, model: str, timeout: float = 60.0, retries: int = JUDGE_RETRIES,
                  log=None) -> dict:
    """Grade every sample; never raises. Returns means, per-story scores, malformed count, or a skip reason."""
    endpoint = chat_url(url)
    per_story: list[dict | None] = []
    malformed = 0
    attempts = 0
    try:
        for i, s in enumerate(samples):
            scores = None
            for _ in range(retries + 1):
                attempts += 1
                reply = _post(endpoint, {"model": model, "messages": judge_messages(s["prompt"], s["text"]),
                                         "temperature": 0}, timeout)
                scores = parse_judge_reply(reply)
                if scores:
                    break
            if scores is None:
                malformed += 1
            per_story.append(scores)
            if log:
                log(f"\r  judged {i + 1}/{len(samples)}")
    except JudgeUnreachable as e:
        return {"skipped": f"judge skipped: {e}", "url": endpoint, "model": model, "judged": 0,
                "malformed": malformed, "scores": per_story}
    good = [p for p in per_story if p]
    means = {k: (sum(p[k] for p in good) / len(good) if good else None) for k in JUDGE_RUBRIC}
    return {"skipped": None, "url": endpoint, "model": model, "judged": len(good), "malformed": malformed,
            "requests": attempts, "means": means, "scores": per_story}


# ------------------------------------------------------------------------------------------------ orchestration


def pick_device(name: str | None) -> str:
    from tinystories.model.device import pick_device as resolve

    return str(resolve(name or "auto"))


def _score_text(model, ck, cache, checkpoint, text, max_tokens: int | None, log) -> dict:
    """The likelihood part of `evaluate`: score `text` (default: the run's validation split), at most `max_tokens`
    tokens. Returns the report's "text" (what was scored), the likelihood figures and "likelihood_seconds"."""
    from tinystories.model.likelihood import encode_documents, likelihood

    tok = ck.tokenizer
    out: dict = {}
    t0 = time.time()
    if text:
        docs = read_documents(text, "--text")
        stream, n_bytes = encode_documents(tok, docs)
        if max_tokens and len(stream) > max_tokens + 1:
            stream = stream[: max_tokens + 1]  # max_tokens predicted tokens
            n_bytes = len(tok.decode(stream.tolist()).encode("utf-8"))
        out["text"] = str(text)
    else:
        if cache is None:
            where = ck.state.get("cache_dir")
            why = f"the run's cache {where} is gone" if where else "this checkpoint does not record its token cache"
            raise UserError(f"{checkpoint}: {why}; pass the text to score with --text FILE "
                            f"(e.g. --text ../shared/data/tinystories/TinyStories-valid-head.txt)")
        cache.check_tokenizer(tok)
        split = cache.split("val")
        if not split.tokens:
            raise UserError(f"{cache.path}: the validation split is empty; pass --text FILE")
        stream, n_bytes = cut_stream(tok, split, max_tokens)
        out["text"] = f"{cache.path} (validation split)"
    if len(stream) < 2:
        raise UserError(f"{out['text']}: no text to score")
    bar = None
    if log is not None and len(stream) > PROGRESS_TOKENS:  # long texts: tokens/s and ETA on stderr
        from tinystories.data.prepare import Progress

        bar = Progress("scoring", lambda line: print(line, file=sys.stderr, flush=True), unit="tokens", scale=1)
    lk = likelihood(model, stream, n_bytes, window=model.cfg.max_seq_len, progress=bar)
    if bar is not None:
        bar.close()
    out.update(lk)
    out["likelihood_seconds"] = time.time() - t0
    return out


def evaluate(checkpoint: str | Path, *, text: str | Path | None = None, max_tokens: int | None = None,
             num_stories: int = DEFAULT_STORIES, reference: str | Path | None = None,
             train_text: str | Path | None = None, sampling=None, judge_url: str | None = None,
             judge_model: str | None = None, judge_timeout: float = 60.0, device: str | None = None,
             prompts: str = "openings", grammar: bool = True, show_grammar_errors: int = 0, log=print) -> dict:
    """Evaluate a checkpoint: likelihood of `text` (default: the run's validation split, at most `max_tokens`
    tokens), `num_stories` sampled stories (SamplingParams `sampling`, default its defaults) against real ones,
    and the LLM judge at `judge_url` when given. Returns every figure as a dict (the JSON report)."""
    from tinystories.evaluation.story_stats import story_stats
    from tinystories.inference.sampling import SamplingParams
    from tinystories.model.checkpoint import load_model

    if num_stories < 0:
        raise UserError(f"--num-stories {num_stories}: must be >= 0 (0 skips generation)")
    if (judge_url is None) != (judge_model is None) and num_stories:
        raise UserError("--judge-url and --judge-model go together "
                        "(e.g. --judge-url http://localhost:8000 --judge-model gpt-4o-mini)")
    params = (sampling or SamplingParams()).validate()
    if max_tokens is not None and max_tokens < 1:
        raise UserError(f"--max-tokens {max_tokens}: must be >= 1 (leave it out to score all the text)")
    for flag, value in (("--text", text), ("--reference", reference), ("--train-text", train_text)):
        if value and not Path(value).exists():  # checked before the model loads and the stories are generated
            raise UserError(f"{flag} {value}: no such file or directory")
    device = pick_device(device)
    model, ck = load_model(checkpoint, device)
    tok = ck.tokenizer
    cache = open_run_cache(ck.state)
    window = model.cfg.max_seq_len
    result: dict = {"checkpoint": str(ck.path), "step": ck.step, "device": device, "window": window}

    # likelihood
    result.update(_score_text(model, ck, cache, checkpoint, text, max_tokens, log))

    # generated stories vs real ones
    result["sampling"] = {"max_new_tokens": params.max_new_tokens, "temperature": params.temperature,
                          "top_k": params.top_k, "top_p": params.top_p, "seed": params.seed, "openings": OPENINGS}
    result["samples"] = []
    result["stories"] = None
    result["judge"] = None
    if num_stories:
        ref, ref_src = reference_stories(tok, cache, reference, text)
        # --- held-out prompts (issue 15): the same starts for the model, the reference and the judge ---
        prompts, prompt_kind = OPENINGS, prompts
        if prompt_kind == "held-out":
            prompts = held_out_prompts(ref, num_stories) or OPENINGS
            result["sampling"]["prompts_note"] = (f"{len(prompts)} beginnings of {ref_src}" if prompts is not OPENINGS
                                                  else "no held-out stories: the fixed openings were used")
        result["sampling"]["prompts"] = "held-out" if prompts is not OPENINGS else "openings"
        result["sampling"]["openings"] = prompts
        # --- end of held-out prompts ---
        t0 = time.time()
        samples = generate_stories(model, tok, num_stories, params, prompts)
        result["generation_seconds"] = time.time() - t0
        vocab, vocab_src = train_vocabulary(tok, cache, train_text)
        result["samples"] = samples
        result["stories"] = {
            "model": story_stats([s["text"] for s in samples], vocab, [s["ended"] for s in samples]),
            "reference": story_stats(ref, vocab) if ref else None,
            "reference_source": ref_src,
            "train_vocabulary": {"source": vocab_src, "words": len(vocab) if vocab is not None else None},
        }
        # --- grammar (issue 15): Link Grammar's verdict on every sentence, generated and real ---
        if grammar:
            from tinystories.evaluation.grammar import grammar_stats, sample_grammar_stats

            keep = max(50, show_grammar_errors or 0)
            result["stories"]["model"].update(sample_grammar_stats(samples, max_errors=keep))
            if ref:
                result["stories"]["reference"].update(grammar_stats(ref, max_errors=keep))
        # --- end of grammar ---
        if judge_url:
            judge_log = (lambda m: print(m, end="", file=sys.stderr)) if sys.stderr.isatty() else None
            result["judge"] = judge_stories(samples, judge_url, judge_model, judge_timeout, log=judge_log)
    return result


def format_result(r: dict, show_grammar_errors: int = 0) -> str:
    from tinystories.evaluation.story_stats import TABLE_ROWS, format_value

    lines = [
        f"checkpoint       {r['checkpoint']} (step {r['step']})",
        f"scored text      {r['text']}",
        f"tokens evaluated {r['tokens']:,} ({r['bytes']:,} bytes, window {r['window']})",
        f"loss per token   {r['loss_per_token']:.4f}",
        f"perplexity       {r['perplexity']:.3f}",
        f"bits per byte    {r['bits_per_byte']:.4f}",
    ]
    st = r.get("stories")
    if st:
        m, ref = st["model"], st["reference"] or {}
        lines += ["", f"{'generated stories vs real ones':34} {'model':>10} {'reference':>10}"]
        for key, label, fmt in TABLE_ROWS:
            lines.append(f"  {label:32} {format_value(m.get(key), fmt):>10} {format_value(ref.get(key), fmt):>10}")
        # --- grammar rows (issue 15) ---
        from tinystories.evaluation.grammar import format_rows

        lines += format_rows(m, ref)
        # --- end of grammar rows ---
        lines.append(f"  reference: {st['reference_source']}")
        lines.append(f"  training vocabulary: {st['train_vocabulary']['source']}")
        ex = m["examples"]
        if ex["agreement_errors"]:
            lines.append(f"  a/an errors e.g.: {', '.join(ex['agreement_errors'])}")
        if m["invented_examples"]:
            lines.append(f"  invented words e.g.: {', '.join(m['invented_examples'])}")
        s0 = r["samples"][0]
        lines.append(f"  sample: {s0['text'][:300]!r}")
        # --- prompts and grammar errors (issue 15) ---
        if r["sampling"].get("prompts_note"):
            lines.append(f"  prompts: {r['sampling']['prompts_note']}")
        if show_grammar_errors:
            from tinystories.evaluation.grammar import format_errors

            lines += [""] + format_errors([s["text"] for s in r["samples"]], m, show_grammar_errors)
        # --- end of prompts and grammar errors ---
    j = r.get("judge")
    if j:
        lines.append("")
        if j["skipped"]:
            lines.append(j["skipped"])
        else:
            means = "  ".join(f"{k} {format_value(v, '{:.2f}')}" for k, v in j["means"].items())
            lines.append(f"judge {j['model']} at {j['url']}: {j['judged']} stories graded, "
                         f"{j['malformed']} malformed replies")
            lines.append(f"  means (1-10): {means}")
    return "\n".join(lines)


def _cmd_eval(args) -> int:
    from tinystories.core.args import check_report_path, write_json_report

    if args.show_grammar_errors < 0:  # issue 15
        raise UserError(f"--show-grammar-errors {args.show_grammar_errors}: must be >= 0")
    if args.json:
        check_report_path(args.json)
    from tinystories.inference.sampling import sampling_params

    result = evaluate(args.checkpoint, text=args.text, max_tokens=args.max_tokens, num_stories=args.num_stories,
                      reference=args.reference, train_text=args.train_text, sampling=sampling_params(args),
                      judge_url=args.judge_url, judge_model=args.judge_model, judge_timeout=args.judge_timeout,
                      device=args.device, prompts=args.prompts, grammar=args.grammar,
                      show_grammar_errors=args.show_grammar_errors)
    if args.json:
        write_json_report(args.json, result)
    print(format_result(result, show_grammar_errors=args.show_grammar_errors))
    return 0
