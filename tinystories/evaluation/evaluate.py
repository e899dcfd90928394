"""`tinystories eval`: likelihood (loss, perplexity, bits per byte) on any text or the run's validation split,
statistics of generated stories next to the same statistics of real stories (evaluation/stories.py picks both,
story_stats.py and grammar.py measure them), and an optional LLM judge (evaluation/judge.py).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from tinystories.core.defaults import DEFAULT_STORIES, OPENINGS
from tinystories.core.errors import UserError
from tinystories.evaluation.judge import judge_stories
from tinystories.evaluation.stories import (
    generate_stories,
    held_out_prompts,
    open_run_cache,
    read_documents,
    reference_stories,
    train_vocabulary,
)

PROGRESS_TOKENS = 100_000  # scoring a longer text shows progress (tokens/s, ETA) on stderr


def pick_device(name: str | None) -> str:
    from tinystories.model.device import pick_device as resolve

    return str(resolve(name or "auto"))


def _score_text(model, ck, cache, checkpoint, text, max_tokens: int | None, log, skip_tokens: int = 0) -> dict:
    """The likelihood part of `evaluate`: score `text` (default: the run's validation split, after its first
    `skip_tokens` tokens), at most `max_tokens` tokens. Returns the report's "text" (what was scored), the
    likelihood figures and "likelihood_seconds"."""
    from tinystories.model.likelihood import cut_split, encode_documents, likelihood

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
        stream, n_bytes = cut_split(split, tok, max_tokens, skip_tokens)
        out["text"] = f"{cache.path} (validation split)"
        if skip_tokens:
            out["text"] = (f"{cache.path} (validation split after its first {skip_tokens:,} tokens, which chose the "
                           f"best checkpoint: text the selection never saw)")
            if len(stream) < 2:
                raise UserError(f"--skip-tokens {skip_tokens}: the validation split of {cache.path} has no text "
                                f"after its first {skip_tokens:,} tokens; lower it or leave it out")
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


def _checked_sampling(sampling, num_stories: int, max_tokens: int | None, judge_url: str | None,
                      judge_model: str | None, paths: dict):
    """The request's mistakes as one-line errors, before the model loads and the stories are generated. Returns the
    sampling parameters (SamplingParams' defaults when `sampling` is None), validated."""
    from tinystories.inference.sampling import SamplingParams

    if num_stories < 0:
        raise UserError(f"--num-stories {num_stories}: must be >= 0 (0 skips generation)")
    if (judge_url is None) != (judge_model is None) and num_stories:
        raise UserError("--judge-url and --judge-model go together "
                        "(e.g. --judge-url http://localhost:8000 --judge-model gpt-4o-mini)")
    params = (sampling or SamplingParams()).validate()
    if max_tokens is not None and max_tokens < 1:
        raise UserError(f"--max-tokens {max_tokens}: must be >= 1 (leave it out to score all the text)")
    for flag, value in paths.items():
        if value and not Path(value).exists():
            raise UserError(f"{flag} {value}: no such file or directory")
    return params


def _pick_prompts(kind: str, ref: list[str], ref_src: str, n: int, sampling: dict) -> list[str]:
    """The prompts of the generated stories, recorded in the report's "sampling": the fixed openings, or with
    kind "held-out" the beginnings of the reference stories (the same starts for the model, the reference and the
    judge; the openings when the reference has none)."""
    held = held_out_prompts(ref, n) if kind == "held-out" else []
    if kind == "held-out":
        sampling["prompts_note"] = (f"{len(held)} beginnings of {ref_src}" if held
                                    else "no held-out stories: the fixed openings were used")
    sampling["prompts"] = "held-out" if held else "openings"
    sampling["openings"] = held or list(OPENINGS)
    return sampling["openings"]


def _story_figures(model, tok, cache, params, sampling: dict, num_stories: int, reference, text, train_text,
                   prompts: str, grammar: bool, show_grammar_errors: int) -> dict:
    """The report's generated stories next to real ones: "samples", their "stories" statistics (and Link Grammar's
    verdict on every sentence, generated and real, unless `grammar` is off) and "generation_seconds"."""
    from tinystories.evaluation.story_stats import story_stats

    ref, ref_src = reference_stories(tok, cache, reference, text)
    chosen = _pick_prompts(prompts, ref, ref_src, num_stories, sampling)
    t0 = time.time()
    samples = generate_stories(model, tok, num_stories, params, chosen)
    seconds = time.time() - t0
    vocab, vocab_src = train_vocabulary(tok, cache, train_text)
    stories = {
        "model": story_stats([s["text"] for s in samples], vocab, [s["ended"] for s in samples]),
        "reference": story_stats(ref, vocab) if ref else None,
        "reference_source": ref_src,
        "train_vocabulary": {"source": vocab_src, "words": len(vocab) if vocab is not None else None},
    }
    if grammar:
        from tinystories.evaluation.grammar import grammar_stats, sample_grammar_stats

        keep = max(50, show_grammar_errors or 0)
        stories["model"].update(sample_grammar_stats(samples, max_errors=keep))
        if ref:
            stories["reference"].update(grammar_stats(ref, max_errors=keep))
    return {"generation_seconds": seconds, "samples": samples, "stories": stories}


def evaluate(checkpoint: str | Path, *, text: str | Path | None = None, max_tokens: int | None = None,
             num_stories: int = DEFAULT_STORIES, reference: str | Path | None = None,
             train_text: str | Path | None = None, sampling=None, judge_url: str | None = None,
             judge_model: str | None = None, judge_timeout: float = 60.0, device: str | None = None,
             prompts: str = "openings", grammar: bool = True, show_grammar_errors: int = 0, dtype: str = "float32",
             log=print, skip_tokens: int = 0) -> dict:
    """Evaluate a checkpoint: likelihood of `text` (default: the run's validation split after its first
    `skip_tokens` tokens, at most `max_tokens` tokens), `num_stories` sampled stories (SamplingParams `sampling`,
    default its defaults) against real ones, and the LLM judge at `judge_url` when given; the weights in precision
    `dtype` (model/precision.py). Returns every figure as a dict (the JSON report)."""
    import torch

    from tinystories.model.checkpoint import load_model
    from tinystories.model.precision import inference_precision

    params = _checked_sampling(sampling, num_stories, max_tokens, judge_url, judge_model,
                               {"--text": text, "--reference": reference, "--train-text": train_text})
    if skip_tokens and text:
        raise UserError(f"--skip-tokens {skip_tokens} skips part of the run's validation split; it does not apply "
                        f"to --text {text}")
    device = pick_device(device)
    model, ck = load_model(checkpoint, device)
    precision = inference_precision(model, torch.device(device), dtype, scoring=True)
    if precision.name != "float32" or dtype == "auto":
        log(precision.describe())
    cache = open_run_cache(ck.state)
    result: dict = {"checkpoint": str(ck.path), "step": ck.step, "device": device, "window": model.cfg.max_seq_len,
                    "dtype": precision.name}
    result.update(_score_text(model, ck, cache, checkpoint, text, max_tokens, log, skip_tokens))
    result["sampling"] = {"max_new_tokens": params.max_new_tokens, "temperature": params.temperature,
                          "top_k": params.top_k, "top_p": params.top_p, "seed": params.seed,
                          "openings": list(OPENINGS)}
    result.update(samples=[], stories=None, judge=None)
    if num_stories:
        result.update(_story_figures(model, ck.tokenizer, cache, params, result["sampling"], num_stories, reference,
                                     text, train_text, prompts, grammar, show_grammar_errors))
        if judge_url:
            judge_log = (lambda m: print(m, end="", file=sys.stderr)) if sys.stderr.isatty() else None
            result["judge"] = judge_stories(result["samples"], judge_url, judge_model, judge_timeout, log=judge_log)
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
        from tinystories.evaluation.grammar import format_rows

        lines += format_rows(m, ref)
        lines.append(f"  reference: {st['reference_source']}")
        lines.append(f"  training vocabulary: {st['train_vocabulary']['source']}")
        ex = m["examples"]
        if ex["agreement_errors"]:
            lines.append(f"  a/an errors e.g.: {', '.join(ex['agreement_errors'])}")
        if m["invented_examples"]:
            lines.append(f"  invented words e.g.: {', '.join(m['invented_examples'])}")
        s0 = r["samples"][0]
        lines.append(f"  sample: {s0['text'][:300]!r}")
        if r["sampling"].get("prompts_note"):
            lines.append(f"  prompts: {r['sampling']['prompts_note']}")
        if show_grammar_errors:
            from tinystories.evaluation.grammar import format_errors

            lines += [""] + format_errors([s["text"] for s in r["samples"]], m, show_grammar_errors)
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

    if args.instruct:
        from tinystories.evaluation.instruct import _cmd_eval_instruct

        return _cmd_eval_instruct(args)
    if args.show_grammar_errors < 0:
        raise UserError(f"--show-grammar-errors {args.show_grammar_errors}: must be >= 0")
    if args.json:
        check_report_path(args.json)
    from tinystories.inference.sampling import sampling_params

    result = evaluate(args.checkpoint, text=args.text, max_tokens=args.max_tokens, num_stories=args.num_stories,
                      reference=args.reference, train_text=args.train_text, sampling=sampling_params(args),
                      judge_url=args.judge_url, judge_model=args.judge_model, judge_timeout=args.judge_timeout,
                      device=args.device, prompts=args.prompts, grammar=args.grammar,
                      show_grammar_errors=args.show_grammar_errors, dtype=args.dtype, skip_tokens=args.skip_tokens)
    if args.json:
        write_json_report(args.json, result)
    print(format_result(result, show_grammar_errors=args.show_grammar_errors))
    return 0
