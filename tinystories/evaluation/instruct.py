"""`tinystories eval --instruct`: how well a model trained on requests (data.format=instruct) follows them.

Requests are drawn from held-out text: a word triple derived from each of N stories (data/requests.py), with
`Dialogue` asked for every other one. Each request is answered four ways, with the same seeds:
- "request": the product's default: the request, decoding's word bias (sampling.WordBias), and the best of
  --candidates stories drawn together (sampling.pick_candidate);
- "request, one story": the bias alone, on a single story (what the server streams);
- "request, no bias": the request alone (what training taught);
- "no request": an empty prompt (how often the words turn up anyway).
A plain model (`--plain-checkpoint`, trained for the same budget) answers with an empty prompt beside them.

Figures per condition: the share of requested words present (inflections count), of stories holding all three,
of stories with dialogue when it was asked and when not; Link Grammar's verdict on the sentences, split into
those holding a requested word and the others; and bits per byte of each model on plain validation text.
"""

from __future__ import annotations

import time

from tinystories.core.errors import UserError

DEFAULT_REQUESTS = 60
MIN_STORY_CHARS = 200  # held-out stories shorter than this give no request
SCORE_TOKENS = 131_072  # validation tokens scored for bits per byte


def held_out_requests(text: str, n: int, tuning: bool = False) -> list:
    """n requests derived from stories spread evenly over `text`; Dialogue asked for every other one. `tuning`:
    from the stories the same call without it does not pick, to choose settings on text that is not reported."""
    from dataclasses import replace

    from tinystories.data.requests import derive_request
    from tinystories.evaluation.stories import read_documents, split_long_documents

    def spread(k: int) -> list[int]:  # n indices spread evenly over k stories
        return [i * k // n for i in range(n)]

    stories = [s for s in split_long_documents(read_documents(text, "--text")) if len(s) >= MIN_STORY_CHARS]
    if tuning:
        reported = set(spread(len(stories)))
        stories = [s for i, s in enumerate(stories) if i not in reported]
    picked = [stories[i] for i in spread(len(stories))] if len(stories) >= n else stories
    reqs = [derive_request(s) for s in picked]
    reqs = [replace(r, features=("Dialogue",) if i % 2 == 0 else ()) for i, r in enumerate(reqs) if len(r.words) == 3]
    if not reqs:
        raise UserError(f"--text {text}: no story of at least {MIN_STORY_CHARS} characters to draw requests from")
    return reqs


def answer(model, tok, reqs: list, prompt_of, bias: float, params, candidates: int = 1) -> list[dict]:
    """One story per request: {"story", "ended", "request"}. `prompt_of(request)` is the prompt; `candidates`: the
    best of that many (sampling.pick_candidate)."""
    from dataclasses import replace

    from tinystories.data.requests import parse_rendered
    from tinystories.inference.sampling import generate_texts

    out = []
    for i, req in enumerate(reqs):
        prompt = prompt_of(req)
        s = generate_texts(model, tok, prompt, replace(params, seed=params.seed + i), 1, req, bias,
                           candidates)[0]
        out.append({"story": parse_rendered(s["text"])[1], "ended": s["ended"], "request": req})
    return out


def follow_figures(answers: list[dict]) -> dict:
    """Words present, all three present, dialogue when asked / not asked."""
    from tinystories.data.requests import contains_word, has_dialogue

    hits = [[contains_word(a["story"], w) for w in a["request"].words] for a in answers]
    asked = [has_dialogue(a["story"]) for a in answers if "Dialogue" in a["request"].features]
    not_asked = [has_dialogue(a["story"]) for a in answers if "Dialogue" not in a["request"].features]
    return {"words_present": _mean([h for row in hits for h in row]), "all_three": _mean([all(h) for h in hits]),
            "dialogue_asked": _mean(asked), "dialogue_not_asked": _mean(not_asked)}


def grammar_figures(answers: list[dict]) -> dict:
    """Link Grammar's share of parsed sentences: all, those holding a requested word, the others."""
    from tinystories.data.requests import contains_word
    from tinystories.evaluation.grammar import PARSED, available, check_sentences
    from tinystories.evaluation.story_stats import sentences

    if not available():
        return {"grammar": None, "grammar_word_sentences": None, "grammar_other_sentences": None}
    rows = []
    for a in answers:
        ss = sentences(a["story"])
        if ss and not a["ended"] and ss[-1].rstrip("\"' ")[-1:] not in ".!?":
            ss = ss[:-1]  # cut at the token limit: the unfinished sentence is not judged
        rows += [(s, any(contains_word(s, w) for w in a["request"].words)) for s in ss]
    verdicts = [v == PARSED for v in check_sentences([s for s, _ in rows])]
    return {"grammar": _mean(verdicts),
            "grammar_word_sentences": _mean([v for v, (_, w) in zip(verdicts, rows) if w]),
            "grammar_other_sentences": _mean([v for v, (_, w) in zip(verdicts, rows) if not w]),
            "sentences": len(rows), "word_sentences": sum(w for _, w in rows)}


def bits_per_byte(model, tok, text: str, max_tokens: int) -> float:
    from tinystories.evaluation.stories import read_documents
    from tinystories.model.likelihood import encode_documents, likelihood

    stream, n_bytes = encode_documents(tok, read_documents(text, "--text"))
    if len(stream) > max_tokens + 1:
        stream = stream[: max_tokens + 1]
        n_bytes = len(tok.decode(stream.tolist()).encode("utf-8"))
    return likelihood(model, stream, n_bytes, window=model.cfg.max_seq_len)["bits_per_byte"]


def _mean(xs: list) -> float | None:
    return sum(xs) / len(xs) if xs else None


def evaluate_instruct(checkpoint: str, text: str, n: int = DEFAULT_REQUESTS, plain_checkpoint: str | None = None,
                      sampling=None, word_bias: float | None = None, max_tokens: int = SCORE_TOKENS,
                      device: str = "cpu", grammar: bool = True, log=print, candidates: int | None = None) -> dict:
    """Every figure of `eval --instruct` as a dict: {"conditions": {name: figures}, "requests": [...], ...}."""
    from tinystories.data.requests import CANDIDATES, WORD_BIAS, ask, request_lines
    from tinystories.inference.sampling import SamplingParams
    from tinystories.model.checkpoint import load_model

    params = (sampling or SamplingParams(max_new_tokens=200)).validate()
    params.seed = 1234 if params.seed is None else params.seed
    bias = WORD_BIAS if word_bias is None else word_bias
    candidates = CANDIDATES if candidates is None else candidates
    model, ck = load_model(checkpoint, device)
    ask(ck.cfg.data.format, ("word",), where=str(ck.path))  # a plain model: the one-line error
    reqs = held_out_requests(text, n)
    runs = {"request": (request_lines, bias, candidates), "request, one story": (request_lines, bias, 1),
            "request, no bias": (request_lines, 0.0, 1), "no request": (lambda r: "", 0.0, 1)}
    result: dict = {"checkpoint": str(ck.path), "step": ck.step, "text": str(text), "word_bias": bias,
                    "candidates": candidates,
                    "sampling": {"temperature": params.temperature, "top_k": params.top_k, "top_p": params.top_p,
                                 "max_new_tokens": params.max_new_tokens, "seed": params.seed},
                    "requests": [{"words": r.words, "features": r.features} for r in reqs], "conditions": {}}
    models = [("instruct", model, ck, runs)]
    if plain_checkpoint:
        pm, pck = load_model(plain_checkpoint, device)
        models.append(("plain model", pm, pck, {"plain model, no request": (lambda r: "", 0.0, 1)}))
    for label, m, c, conds in models:
        t0 = time.time()
        bpb = bits_per_byte(m, c.tokenizer, text, max_tokens)
        for name, (prompt_of, b, k) in conds.items():
            answers = answer(m, c.tokenizer, reqs, prompt_of, b, params, k)
            figs = follow_figures(answers) | (grammar_figures(answers) if grammar else {}) | {"bits_per_byte": bpb}
            figs["example"] = {"request": prompt_of(reqs[0]), "story": answers[0]["story"]}
            result["conditions"][name] = figs
        log(f"  {label} ({c.path}): {time.time() - t0:.0f}s")
    return result


ROWS = [("words_present", "requested words present"), ("all_three", "stories with all three"),
        ("dialogue_asked", "dialogue, asked"), ("dialogue_not_asked", "dialogue, not asked"),
        ("grammar", "grammatical sentences"), ("grammar_word_sentences", "  with a requested word"),
        ("grammar_other_sentences", "  the other sentences"), ("bits_per_byte", "bits per byte (plain text)")]


def format_instruct(r: dict) -> str:
    conds = r["conditions"]
    width = max(18, *(len(c) + 2 for c in conds))
    lines = [f"checkpoint {r['checkpoint']} (step {r['step']}); {len(r['requests'])} requests from {r['text']}; "
             f"word bias {r['word_bias']:g}, best of {r['candidates']}, temperature {r['sampling']['temperature']:g}",
             f"{'':28}" + "".join(f"{c:>{width}}" for c in conds)]
    for key, label in ROWS:
        cells = [conds[c].get(key) for c in conds]
        fmt = "{:.4f}" if key == "bits_per_byte" else "{:.0%}"
        lines.append(f"{label:28}" + "".join(f"{'-' if v is None else fmt.format(v):>{width}}" for v in cells))
    ex = conds["request"]["example"]
    lines += ["", "example request:", ex["request"].rstrip(), ex["story"][:600]]
    return "\n".join(lines)


def _cmd_eval_instruct(args) -> int:
    from tinystories.core.args import write_json_report
    from tinystories.inference.sampling import sampling_params
    from tinystories.model.device import pick_device

    if not args.text:
        raise UserError("--instruct needs --text FILE: held-out stories to draw requests from and score "
                        "(e.g. --text ../shared/data/tinystories/TinyStories-valid-head.txt)")
    if args.num_stories < 1:
        raise UserError(f"--num-stories {args.num_stories}: must be >= 1 (requests to ask)")
    params = sampling_params(args)
    if params.max_new_tokens == 256:
        params.max_new_tokens = 200
    r = evaluate_instruct(args.checkpoint, args.text, args.num_stories, args.plain_checkpoint, params,
                          args.word_bias, args.max_tokens or SCORE_TOKENS, str(pick_device(args.device or "auto")),
                          args.grammar, candidates=args.candidates)
    if args.json:
        write_json_report(args.json, r)
    print(format_instruct(r))
    return 0
