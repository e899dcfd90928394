"""`tinystories doctor RUN_DIR`: a checklist of what commonly goes wrong in a TinyStories run, each check
PASS / WARN / FAIL (or SKIP when the run lacks what it needs, e.g. an imported checkpoint has no metrics),
with the concrete fix for every WARN and FAIL. Exit status 0 when nothing FAILs, else 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from tinystories.core.defaults import SAMPLE_STORIES
from tinystories.core.errors import UserError
from tinystories.core.metrics import read_metrics
from tinystories.core.runs import run_dir_of
from tinystories.training.schedule import PROVISIONAL_TOTAL, Schedule

ARTICLE_PIECES = ("the", "a", "an")
MIN_ARTICLE_SHARE = 0.02  # " the" + " a" + " an" are ~6% of tokens in real TinyStories
MIN_TOKENS_PER_ENTRY = 100  # train tokens per vocabulary entry
MAX_UNUSED_SHARE = 0.30  # BPE intermediate merges are often unused even on the text it was trained on
COUNT_TOKENS = 50_000_000  # count at most this many train tokens


@dataclass
class Check:
    name: str
    status: str  # PASS WARN FAIL SKIP
    detail: str
    fix: str = ""


# ------------------------------------------------------------------------------------------------ checks


def check_articles(tok, counts: np.ndarray | None) -> Check:
    ids = {w: tok.piece_id(w, True) for w in ARTICLE_PIECES}
    split = [f"' {w}'" for w, i in ids.items() if i is None]
    if split:
        return Check("article tokens", "FAIL",
                     f"{', '.join(split)} {'is' if len(split) == 1 else 'are'} split into several tokens "
                     f"by {tok.path.name} "
                     f"({tok.vocab_size:,} entries): the model must spell the commonest words piece by piece",
                     "train a tokenizer with a larger vocabulary on TinyStories, e.g. `tinystories tokenizer train "
                     "--vocab-size 4096 --out data/tok4k`, rebuild the cache with it and retrain")
    if counts is None:
        return Check("article tokens", "PASS", "' the', ' a', ' an' are single tokens (no cache to count them in)")
    total = int(counts.sum())
    shares = {w: counts[i] / total if total else 0.0 for w, i in ids.items()}
    detail = ", ".join(f"' {w}' {shares[w]:.2%}" for w in ARTICLE_PIECES) + " of train tokens"
    if sum(shares.values()) < MIN_ARTICLE_SHARE:
        return Check("article tokens", "WARN", f"single tokens but rare: {detail}",
                     "the text or the tokenizer does not look like TinyStories English; "
                     "check the run's data.source and tokenizer")
    return Check("article tokens", "PASS", f"single tokens; {detail}")


def check_cache(tok, state: dict) -> tuple[Check, object]:
    from tinystories.data.cache import TokenCache

    cache_dir = state.get("cache_dir")
    if not cache_dir:
        return Check("cache matches tokenizer", "SKIP",
                     "the checkpoint records no cache_dir (imported checkpoint?)"), None
    if not (Path(cache_dir) / "manifest.json").is_file():
        return Check("cache matches tokenizer", "WARN", f"the run's cache {cache_dir} is gone",
                     "rebuild it with `tinystories data prepare --tokenizer CHECKPOINT_DIR --from SOURCE` "
                     "(eval then needs --text)"), None
    try:
        cache = TokenCache.open(cache_dir)
    except UserError as e:
        return Check("cache matches tokenizer", "FAIL", str(e), "rebuild it with `tinystories data prepare`"), None
    want = cache.tokenizer_sha256
    if want != tok.sha256:
        return Check("cache matches tokenizer", "FAIL",
                     f"cache {cache.manifest.get('fingerprint', Path(cache_dir).name)} was built with tokenizer "
                     f"{cache.manifest['tokenizer'].get('path', '?')} (sha256 {want[:12]}), the checkpoint's tokenizer "
                     f"is sha256 {tok.sha256[:12]}: the model learned from ids that mean other text",
                     f"rebuild the cache with the run's tokenizer: "
                     f"`tinystories data prepare --tokenizer {tok.path.parent} --from SOURCE`, then retrain"), cache
    return Check("cache matches tokenizer", "PASS",
                 f"cache {cache.manifest.get('fingerprint', '')} built with this tokenizer (sha256 {want[:12]})"), cache


def check_val_loss(metrics: list[dict] | None, cfg=None) -> Check:
    name = "validation loss"
    if metrics is None:
        return Check(name, "SKIP", "no metrics.jsonl (imported checkpoint or not a run directory)")
    val = [m for m in metrics if m.get("kind") == "val" and isinstance(m.get("val_loss"), (int, float))]
    if len(val) < 2:
        return Check(name, "SKIP", f"{len(val)} evaluation(s) logged; need 2 to see a trend")
    losses = [float(m["val_loss"]) for m in val]
    best_i = int(np.argmin(losses))
    best, last = losses[best_i], losses[-1]
    gap = None
    if isinstance(val[-1].get("train_loss"), (int, float)):
        gap = last - float(val[-1]["train_loss"])
    gap_txt = f"; train/val gap {gap:+.3f}" if gap is not None else ""
    trend = (f"val loss {losses[0]:.3f} -> best {best:.3f} (step {val[best_i].get('step')}) "
             f"-> last {last:.3f} (step {val[-1].get('step')}){gap_txt}")
    from tinystories.training.sizing import MANY_PASSES_DROPOUT, MANY_PASSES_MUON_WD, MAX_PASSES

    dropout = cfg.model.dropout if cfg is not None else 0.0
    regularise = (f"raise model.dropout (now {dropout:g}) to {min(0.3, dropout + MANY_PASSES_DROPOUT):.1f}"
                  if dropout > 0 else f"add model.dropout={MANY_PASSES_DROPOUT:g}")
    if cfg is not None and cfg.train.optimizer == "muon" and not cfg.train.muon_weight_decay:
        regularise += f", add train.muon_weight_decay={MANY_PASSES_MUON_WD:g}"
    fix = (f"the model is overfitting: use more data (drop data.max_stories), {regularise}, train fewer "
           f"epochs (train.max_passes={MAX_PASSES:g} stops a time budget there) or set "
           "train.early_stopping_patience; use checkpoints/best, not latest")
    if best_i < len(losses) - 1 and last > best * 1.05:
        return Check(name, "FAIL", f"turned up {100 * (last / best - 1):.1f}% above its best: {trend}", fix)
    if best_i < len(losses) - 1 and last > best * 1.01:
        return Check(name, "WARN", f"rising: {trend}", fix)
    if gap is not None and gap > 0.3:
        return Check(name, "WARN", f"large train/val gap: {trend}", fix)
    if len(losses) >= 4 and losses[-4] - last < 0.005 * losses[-4]:
        return Check(name, "WARN", f"flat over the last 3 evaluations: {trend}",
                     "training has stopped improving: lower train.lr, or stop here")
    return Check(name, "PASS", f"still falling: {trend}")


def _schedule_change(a: Schedule, b: Schedule) -> str:
    """What a resume changed in the schedule, e.g. 'lr 0.003 -> 0.001, min_lr 0.0003 -> 0.0001'."""
    fmt = lambda v: f"{v:g}" if isinstance(v, (int, float)) else str(v)  # noqa: E731
    da, db = a.to_dict(), b.to_dict()
    return ", ".join(f"{k} {fmt(da[k])} -> {fmt(db[k])}" for k in da if da[k] != db[k])


def check_lr(metrics: list[dict] | None, cfg, state: dict) -> Check:
    """Every logged learning rate against the trainer's own schedule (schedule.lr_at). A train point logs the lr of
    its last optimizer step (step - 1) and the run length it was scheduled for: that length changes when a time
    budget fixes it after its first steps, or when a run is resumed with a new train.max_steps (the cosine is
    stretched). A resume may also change the schedule itself (--set train.lr=...): each start or resume writes a
    segment row with its schedule, and a point is checked against the schedule of the segment it was logged in
    (metrics from before segment rows: the run's config)."""
    name = "lr schedule"
    if metrics is None:
        return Check(name, "SKIP", "no metrics.jsonl (imported checkpoint or not a run directory)")
    final_total = state.get("total_steps") or cfg.train.max_steps
    configured = Schedule.of(cfg.train)
    sched, changes = configured, []  # the schedule in effect; (step, what changed) at each segment that changed it
    pts = []
    for m in metrics:
        if m.get("kind") == "segment" and isinstance(m.get("schedule"), dict):
            seg = Schedule.from_dict(m["schedule"])
            if seg is not None:
                if seg != sched and (pts or changes):
                    changes.append((m.get("step"), _schedule_change(sched, seg)))
                sched = seg
        elif m.get("kind") == "train" and isinstance(m.get("lr"), (int, float)) and isinstance(m.get("step"), int):
            pts.append((m, sched))
    if len(pts) < 2 or not (final_total or any(m.get("total_steps") for m, _ in pts)):
        return Check(name, "SKIP", "no logged learning rates or no total_steps in state.json")
    bad, lengths = [], []
    for m, sc in pts:
        step, lr = m["step"], float(m["lr"])
        if "total_steps" in m:  # the exact schedule of that step
            total = m["total_steps"] or PROVISIONAL_TOTAL
            exp = [sc.lr_at(step - 1, total)]
            if m["total_steps"] and (not lengths or lengths[-1][1] != total):
                lengths.append((step, total))
        else:  # metrics from before the length was logged: the final length, either step convention
            exp = [sc.lr_at(step + s, int(final_total)) for s in (-1, 0, 1)]
        if all(abs(lr - e) > max(0.05 * abs(e), 1e-3 * sc.lr) for e in exp):
            bad.append((step, lr, exp[0]))
    total = lengths[-1][1] if lengths else int(final_total)
    last = pts[-1][1]
    want = (last.describe(total)
            + ("; run length " + " -> ".join(f"{a} from step {s}" for s, a in lengths) if len(lengths) > 1 else "")
            + "".join(f"; resumed at step {s} with {what}" for s, what in changes))
    if len(bad) > max(1, 0.05 * len(pts)):
        step, lr, exp = bad[len(bad) // 2]
        where = "their segment's schedule" if changes else "the config"
        return Check(name, "FAIL", f"{len(bad)} of {len(pts)} logged lrs differ from {where} ({want}); "
                                   f"e.g. step {step}: lr {lr:.3g}, expected {exp:.3g}",
                     "the run did not follow its config: check train.lr/min_lr/warmup_steps in RUN_DIR/config.yaml "
                     "(a resumed run reads them from there)")
    return Check(name, "PASS", f"{len(pts)} logged lrs follow {want}")


def _base_symbol(piece: str) -> bool:
    """A tokenizer's base alphabet entry: one symbol (byte-level BPE's 256 bytes, a SentencePiece character) or a
    SentencePiece byte-fallback piece like <0x0A>."""
    return len(piece) == 1 or (piece.startswith("<0x") and piece.endswith(">") and len(piece) == 6)


def check_vocab_size(tok, cache, counts: np.ndarray | None) -> Check:
    name = "vocabulary vs data"
    if cache is None:
        return Check(name, "SKIP", "no token cache to measure the training data")
    train_tokens = int(cache.manifest["splits"]["train"]["tokens"])
    per_entry = train_tokens / tok.vocab_size
    unused = None
    if counts is not None:
        # entries that can be unused harmlessly: special tokens and the single-byte base alphabet (a byte-level BPE
        # keeps all 256 bytes for coverage; most never occur in English stories). Learned merges must be used.
        special = tok.special_ids
        unused = int(sum(1 for i in range(tok.vocab_size) if counts[i] == 0 and i not in special
                         and not _base_symbol(tok.id_to_piece(i))))
    detail = f"{train_tokens:,} train tokens for {tok.vocab_size:,} entries ({per_entry:.0f} tokens per entry)"
    if unused is not None:
        detail += f"; {unused:,} entries ({unused / tok.vocab_size:.1%}) never occur in the train split"
    if per_entry < MIN_TOKENS_PER_ENTRY or (unused is not None and unused / tok.vocab_size > MAX_UNUSED_SHARE):
        suggest = max(512, min(tok.vocab_size // 2, 2 ** int(math.log2(max(train_tokens // 1000, 512)))))
        return Check(name, "WARN",
                     f"large vocabulary on small data: {detail}; rare entries get too few updates to learn",
                     f"use a smaller vocabulary (e.g. `tinystories tokenizer train --vocab-size {suggest}`) "
                     "or much more data")
    return Check(name, "PASS", detail)


def sample_stories(model, tok, n: int) -> list[dict]:
    from tinystories.evaluation.stories import generate_stories
    from tinystories.inference.sampling import SamplingParams

    return generate_stories(model, tok, n, SamplingParams(max_new_tokens=128, seed=1234))


def check_samples(model, tok, reference: list[str], n: int, samples: list[dict] | None = None) -> Check:
    from tinystories.evaluation.story_stats import story_stats

    name = "articles in samples"
    if model is None:
        return Check(name, "SKIP", "not asked (--samples 0)")
    samples = samples if samples is not None else sample_stories(model, tok, n)
    got = story_stats([s["text"] for s in samples])["articles_per_100_words"] or 0.0
    if not reference:
        return Check(name, "SKIP",
                     f"{got:.1f} articles per 100 words in {n} samples; no reference text (pass --reference)")
    ref = story_stats(reference)["articles_per_100_words"] or 0.0
    detail = f"{got:.1f} articles per 100 words in {n} samples vs {ref:.1f} in real stories"
    if got < 0.5 * ref:
        return Check(name, "WARN", f"too few: {detail}",
                     "train longer; if ' a'/' the' are split tokens or the cache does not match, fix those first")
    if got > 2 * ref:
        return Check(name, "WARN", f"too many: {detail} (an undertrained model strings articles together)",
                     "train longer; check the samples by eye with `tinystories generate`")
    return Check(name, "PASS", detail)


# ------------------------------------------------------------------------------------------------ grammar
GRAMMAR_PASS_POINTS = 5.0  # PASS within this many percentage points of real text's grammatical-sentence rate
GRAMMAR_WARN_POINTS = 15.0  # WARN within this many; FAIL below
GRAMMAR_REFERENCE_STORIES = 100  # real stories parsed for the comparison (~400 sentences, a few seconds)


def check_grammar(samples: list[dict] | None, reference: list[str]) -> Check:
    """The share of the samples' sentences Link Grammar parses completely, against the same share in real text."""
    from tinystories.evaluation.grammar import NOT_MEASURED, available, grammar_stats, sample_grammar_stats

    name = "grammar (link-parser)"
    if samples is None:
        return Check(name, "SKIP", "not asked (--samples 0)")
    if not available():
        return Check(name, "SKIP", NOT_MEASURED)
    got = sample_grammar_stats(samples)
    if not got["grammar_sentences"]:
        return Check(name, "WARN", f"the {len(samples)} samples have no sentence to parse",
                     "train longer; look at the samples with `tinystories generate`")
    detail = (f"{got['grammatical_sentences']:.1%} of {got['grammar_sentences']} sentences in {len(samples)} samples "
              f"parse completely")
    if not reference:
        return Check(name, "SKIP", f"{detail}; no reference text (pass --reference)")
    ref = grammar_stats(reference[:GRAMMAR_REFERENCE_STORIES])
    gap = 100 * (ref["grammatical_sentences"] - got["grammatical_sentences"])
    detail += f" vs {ref['grammatical_sentences']:.1%} of {ref['grammar_sentences']} in real stories"
    fix = ("train longer: in docs/eval.md the rate climbs with the tokens a model has seen (6% at 102K tokens, 80% at "
           "307K for a 1.3M model) and stories260K, trained on all of TinyStories, reaches 95.5%; see which sentences "
           "fail with `tinystories eval --checkpoint RUN --show-grammar-errors 10`")
    if gap <= GRAMMAR_PASS_POINTS:
        return Check(name, "PASS", detail)
    if gap <= GRAMMAR_WARN_POINTS:
        return Check(name, "WARN", f"{gap:.1f} points below real text: {detail}", fix)
    return Check(name, "FAIL", f"{gap:.1f} points below real text: {detail}", fix)


def token_counts(cache, vocab_size: int) -> np.ndarray:
    stream = cache.split("train").stream()[:COUNT_TOKENS]
    counts = np.zeros(vocab_size, dtype=np.int64)
    step = 1 << 24
    for i in range(0, len(stream), step):
        counts += np.bincount(np.asarray(stream[i : i + step], dtype=np.int64), minlength=vocab_size)[:vocab_size]
    return counts


def run_checks(run_dir: str | Path, samples: int = SAMPLE_STORIES, reference: str | None = None,
               device: str = "cpu") -> tuple[list[Check], str]:
    from tinystories.core.config import config_from_dict
    from tinystories.model.checkpoint import load_model, read_checkpoint

    run = Path(run_dir)
    if not run.exists():
        raise UserError(f"{run}: no such run directory")
    ck = read_checkpoint(run, prefer="latest")
    tok, state = ck.tokenizer, ck.state
    cfg = ck.cfg
    if (run / "config.yaml").is_file() and run.resolve() != ck.path.resolve():
        try:
            cfg = config_from_dict(yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8")) or {},
                                   str(run / "config.yaml"))
        except (UserError, yaml.YAMLError):
            pass
    metrics = read_metrics(run_dir_of(run) or run)  # a checkpoint inside a run directory: the run's metrics
    checks: list[Check] = []
    cache_check, cache = check_cache(tok, state)
    counts = None
    if cache is not None and cache_check.status != "FAIL":
        counts = token_counts(cache, tok.vocab_size)
    checks.append(check_articles(tok, counts))
    checks.append(cache_check)
    checks.append(check_val_loss(metrics, cfg))
    checks.append(check_lr(metrics, cfg, state))
    if samples > 0:
        from tinystories.evaluation.stories import reference_stories

        model, _ = load_model(ck.path, device)
        ref, _ = reference_stories(tok, cache if cache_check.status != "FAIL" else None, reference, None)
        stories = sample_stories(model, tok, samples)
        checks.append(check_samples(model, tok, ref, samples, stories))
        checks.append(check_grammar(stories, ref))
    else:
        checks.append(check_samples(None, tok, [], 0))
        checks.append(check_grammar(None, []))
    checks.append(check_vocab_size(tok, cache if cache_check.status != "FAIL" else None, counts))
    return checks, str(ck.path)


def format_checks(checks: list[Check]) -> str:
    lines = []
    for c in checks:
        lines.append(f"{c.status:4}  {c.name}: {c.detail}")
        if c.fix and c.status in ("WARN", "FAIL"):
            lines.append(f"      fix: {c.fix}")
    n = {s: sum(1 for c in checks if c.status == s) for s in ("PASS", "WARN", "FAIL", "SKIP")}
    lines.append(f"{n['PASS']} passed, {n['WARN']} warnings, {n['FAIL']} failed, {n['SKIP']} skipped")
    return "\n".join(lines)


def _cmd_doctor(args) -> int:
    from tinystories.core.args import check_report_path, write_json_report
    from tinystories.evaluation.evaluate import pick_device

    if args.samples < 0:
        raise UserError(f"--samples {args.samples}: must be >= 0 (0 skips the sample check)")
    if args.json:
        check_report_path(args.json)
    checks, ck_path = run_checks(args.run_dir, args.samples, args.reference, pick_device(args.device))
    print(f"checkpoint {ck_path}")
    print(format_checks(checks))
    if args.json:
        write_json_report(args.json, [c.__dict__ for c in checks])
    return 1 if any(c.status == "FAIL" for c in checks) else 0
