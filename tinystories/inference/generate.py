"""`tinystories generate`: write stories with a trained or imported model, streamed as they are produced."""

from __future__ import annotations

import sys
import time

import torch

from tinystories.inference.sampling import (
    SamplingParams,
    StreamDecoder,
    WordBias,
    compile_decoding_now,
    generate_texts,
    prompt_ids,
    request_bias,
    sample,
    sampling_params,
)


def stream_story(model, tok, prompt: str, params: SamplingParams, out=sys.stdout, bias: WordBias | None = None) -> dict:
    """Print one story token by token (UTF-8 safe). Returns counts and speed."""
    ids = prompt_ids(tok, prompt)
    dec = StreamDecoder(tok, ids)
    out.write(prompt)
    out.flush()
    n, ended = 0, False
    t0 = time.perf_counter()
    for step in sample(model, [ids], params, tok.stop_ids, biases=[bias] if bias else None):
        t = int(step.tokens[0])
        if t in tok.stop_ids:
            ended = True
            break
        n += 1
        piece = dec.push(t)
        if piece:
            out.write(piece)
            out.flush()
    secs = time.perf_counter() - t0
    out.write("\n")
    return {"tokens": n, "seconds": secs, "ended": ended}


def _cmd_generate(args) -> int:
    from tinystories.core.errors import UserError
    from tinystories.model.checkpoint import load_model

    params = sampling_params(args)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    from tinystories.data.requests import ask, request_lines
    from tinystories.model.device import pick_device
    from tinystories.model.precision import inference_precision

    device = pick_device(args.device)
    model, ck = load_model(args.checkpoint, device)
    tok = ck.tokenizer
    req = ask(ck.cfg.data.format, args.words, args.features, args.summary, where=str(ck.path))
    head = request_lines(req) if req else ""  # the request in front of each opening
    info = sys.stderr
    precision = inference_precision(model, device, args.dtype)
    if precision.name != "float32" or args.dtype == "auto":
        print(precision.describe(), file=info, flush=True)
    if args.compile:  # compiled before the first story, so that its tokens/s line is the decoding speed
        compile_decoding_now(model, tok.doc_start_id, lambda line: print(line, file=info, flush=True))

    def one(prompt: str) -> None:
        prompt = head + prompt
        n_prompt = len(prompt_ids(tok, prompt))
        if n_prompt >= model.cfg.max_seq_len:
            raise UserError(f"the prompt is {n_prompt} tokens; the model's context is {model.cfg.max_seq_len} "
                            f"tokens")
        k = args.candidates if req else 1
        if args.num_samples == 1 and k == 1:
            r = stream_story(model, tok, prompt, params,
                             bias=request_bias(tok, req, args.word_bias))
            speed = r["tokens"] / max(r["seconds"], 1e-9)
            print(f"[{r['tokens']} tokens in {r['seconds']:.2f}s, {speed:.0f} tokens/s"
                  f"{', end of story' if r['ended'] else ''}]", file=info)
            return
        t0 = time.perf_counter()
        stories = generate_texts(model, tok, prompt, params, args.num_samples, req, args.word_bias, k)
        print_stories(stories, k, time.perf_counter() - t0, info)

    if args.prompt is not None or req:  # a request without --prompt: one story, from the request alone
        one(args.prompt or "")
        return 0
    print(f"{ck.path} ({model.num_params() / 1e6:.2f}M parameters). Type a story opening; an empty line starts "
          f"from nothing; Ctrl-D quits.", file=info)
    while True:
        try:
            prompt = input("> " if sys.stdin.isatty() else "")
        except EOFError:
            return 0
        one(prompt.rstrip("\n"))
        if params.seed is not None:
            params.seed += 1  # a new story for the same opening next time


def print_stories(stories: list[dict], candidates: int, secs: float, info) -> None:
    """Stories on stdout, the counts on `info`; one story (the best of `candidates`) as a streamed one reads."""
    if len(stories) == 1:
        s = stories[0]
        print(s["text"])
        print(f"[the best of {candidates} stories: {s['tokens']} tokens; {candidates} stories in {secs:.2f}s"
              f"{', end of story' if s['ended'] else ''}]", file=info)
        return
    for i, s in enumerate(stories, 1):
        print(f"--- story {i}{' (end of story)' if s['ended'] else ''}\n{s['text']}")
    total = sum(s["tokens"] for s in stories)
    print(f"[{len(stories)} stories, {total} tokens in {secs:.2f}s, {total / max(secs, 1e-9):.0f} tokens/s]",
          file=info)


def greedy_ids(model, tok, prompt: str, n: int) -> list[int]:
    """The first `n` greedy tokens after `prompt` (fewer where the story ends)."""
    params = SamplingParams(max_new_tokens=n, temperature=0.0)
    out = []
    for step in sample(model, [prompt_ids(tok, prompt)], params, tok.stop_ids):
        out.append(int(step.tokens[0]))
        if out[-1] in tok.stop_ids:
            break
    return out


def fidelity(reference, model, tok, prompts: list[str], text: str, max_tokens: int, n: int = 50) -> dict:
    """How `model` (another precision of `reference`'s weights) departs from it: bits per byte of the first
    `max_tokens` tokens of `text` (one document) for both, their relative change, and for each prompt the number of
    greedy tokens (of the first `n`) before the two first differ (n where they never do)."""
    from tinystories.model.likelihood import encode_documents, likelihood

    stream, _ = encode_documents(tok, [text])
    stream = stream[: max_tokens + 1]
    n_bytes = len(tok.decode(stream[1:].tolist()).encode("utf-8"))
    ref_bpb = likelihood(reference, stream, n_bytes)["bits_per_byte"]
    bpb = likelihood(model, stream, n_bytes)["bits_per_byte"]
    same, equal = [], 0
    for prompt in prompts:
        a, b = greedy_ids(reference, tok, prompt, n), greedy_ids(model, tok, prompt, n)
        same.append(next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), n if a == b else min(len(a), len(b))))
        equal += a == b
    return {"bpb_float32": ref_bpb, "bpb": bpb, "bpb_change": bpb / ref_bpb - 1, "greedy_same_tokens": same,
            "greedy_equal": equal}
