"""The Hugging Face Hub side of `tinystories export`: the model card (README.md) of every export, and
`--push-to-hub OWNER/NAME [--private] [--revision BRANCH]`.

The card follows the Hub's format: YAML metadata (license, datasets, language, library_name, pipeline_tag, tags),
then what the model is, how it was trained and how well it does (from the checkpoint's state.json, the run's
metrics.jsonl and an `eval --json` report when one exists), a sample story and how to load it.

The push is `HfApi.create_repo(exist_ok=True)` (+ `create_branch` for --revision) and one `upload_folder`
commit, with the token from the usual places (HF_TOKEN, `hf auth login`). A Hub commit is all or nothing: when
any step fails, the command says which (offline, unauthenticated, forbidden, ...) in one line and exits 2, and
never reports the push as done.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from tinystories.core.defaults import SAMPLE_PROMPT
from tinystories.core.errors import UserError
from tinystories.core.metrics import read_metrics
from tinystories.core.runs import run_dir_of

DATASET = "roneneldan/TinyStories"
REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
LIMITATIONS = ["## Limitations", "",
               "A tiny model trained on simple synthetic stories: it writes short stories with a small vocabulary, "
               "makes grammatical and logical slips, and knows nothing else. Not for factual questions or any use "
               "where mistakes matter.", ""]


# ------------------------------------------------------------------------------------------------ model card


def training_time_s(ck_path: Path, step: int) -> float | None:
    """Seconds of training up to `step`, from the run's metrics.jsonl (the last record at or before it)."""
    run = run_dir_of(ck_path)
    records = read_metrics(run) if run else None
    t = None
    for rec in records or []:
        if isinstance(rec.get("time"), (int, float)) and isinstance(rec.get("step", 0), int) \
                and rec.get("step", 0) <= step:
            t = float(rec["time"])
    return t


def find_eval_report(ck_path: Path, explicit: str | None = None) -> tuple[dict, Path] | tuple[None, None]:
    """An `eval --json` report for this checkpoint: `explicit` (--eval-json), else a *.json in the run directory or
    the checkpoint directory whose "checkpoint" is this checkpoint (the newest)."""
    if explicit:
        p = Path(explicit)
        try:
            rep = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise UserError(f"--eval-json {p}: cannot read it as JSON ({getattr(e, 'strerror', None) or e})") from None
        if not isinstance(rep, dict) or "bits_per_byte" not in rep:
            raise UserError(f"--eval-json {p}: not a `tinystories eval --json` report (no bits_per_byte)")
        return rep, p
    found = []
    for d in filter(None, (run_dir_of(ck_path), ck_path)):
        for p in d.glob("*.json"):
            try:
                rep = json.loads(p.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            if isinstance(rep, dict) and "bits_per_byte" in rep and rep.get("checkpoint") \
                    and Path(rep["checkpoint"]).resolve() == ck_path.resolve():
                found.append((p.stat().st_mtime, p, rep))
    if not found:
        return None, None
    _, p, rep = max(found, key=lambda x: x[0])
    return rep, p


def _fmt(v, spec: str = "{:.4f}") -> str:
    return "-" if v is None else spec.format(v)


def _eval_table(rep: dict) -> list[str]:
    from tinystories.evaluation.story_stats import TABLE_ROWS, format_value

    lines = ["| metric | value |", "| --- | --- |",
             f"| scored text | {rep.get('text', '-')} |",
             f"| tokens scored | {rep.get('tokens', 0):,} |",
             f"| loss per token | {_fmt(rep.get('loss_per_token'))} |",
             f"| perplexity | {_fmt(rep.get('perplexity'), '{:.3f}')} |",
             f"| bits per byte | {_fmt(rep.get('bits_per_byte'))} |"]
    st = rep.get("stories")
    if st and st.get("model"):
        m, ref = st["model"], st.get("reference") or {}
        lines += ["", "| generated stories vs real ones | model | reference |", "| --- | --- | --- |"]
        lines += [f"| {label} | {format_value(m.get(key), fmt)} | {format_value(ref.get(key), fmt)} |"
                  for key, label, fmt in TABLE_ROWS]
    j = rep.get("judge")
    if j and not j.get("skipped"):
        lines += ["", f"LLM judge ({j.get('model')}, {j.get('judged')} stories, 1-10): " +
                  ", ".join(f"{k} {format_value(v, '{:.2f}')}" for k, v in (j.get("means") or {}).items())]
    return lines


def _sample_story(model, tok) -> tuple[str, str]:
    from tinystories.inference.sampling import SamplingParams, generate_texts

    p = SamplingParams(max_new_tokens=min(200, model.cfg.max_seq_len - 8))
    text = generate_texts(model, tok, SAMPLE_PROMPT, p)[0]["text"]  # the prompt and its continuation
    how = (f"temperature {p.temperature}, top-k {p.top_k}, top-p {p.top_p}, seed {p.seed}, "
           f"at most {p.max_new_tokens} tokens")
    return text, how


def _metadata(name: str, n_params: int, fmt: str, imported: bool) -> list[str]:
    """The YAML block the Hub reads (license, datasets, tags, ...), the title and what the model is."""
    meta = {
        "license": "mit" if imported else "cdla-sharing-1.0",
        "datasets": [DATASET],
        "language": ["en"],
        "library_name": "transformers" if fmt == "hf" else "gguf",
        "pipeline_tag": "text-generation",
        "tags": ["tinystories", "llama", "text-generation", "story-generation", "small-language-model"]
        + (["gguf", "llama.cpp"] if fmt == "gguf" else []) + (["llama2.c"] if imported else []),
    }
    return ["---", yaml.safe_dump(meta, sort_keys=False).strip(), "---", "", f"# {name}", "",
            f"A {n_params / 1e6:.2f}M-parameter Llama-style language model that writes short children's stories "
            f"in the style of [TinyStories](https://huggingface.co/datasets/{DATASET}) (Eldan & Li, 2023), "
            f"exported by the tinystories toolkit.", ""]


def _model_section(m, n_params: int, tok, fmt: str, gguf_name: str | None) -> list[str]:
    """## Model: the architecture's sizes and the tokenizer (and the GGUF file)."""
    from tinystories.data.tokenizer import tokenizer_file_name

    tok_desc = (f"byte-level BPE (GPT-2 style) with {tok.vocab_size:,} tokens; `{tok.id_to_piece(tok.doc_start_id)}` "
                f"starts every story" if tok.kind == "bpe" else
                f"SentencePiece ({tok.vocab_size:,} tokens); BOS `{tok.id_to_piece(tok.doc_start_id)}` starts "
                f"every story")
    lines = ["## Model", "", "| | |", "| --- | --- |",
             "| architecture | Llama (RMSNorm, rotary embeddings, SwiGLU, grouped-query attention) |",
             f"| parameters | {n_params:,} |",
             f"| layers / width / FFN width | {m.n_layers} / {m.dim} / {m.ffn_dim} |",
             f"| attention heads / key-value heads | {m.n_heads} / {m.kv_heads} (head size {m.head_dim}) |",
             f"| context | {m.max_seq_len} tokens |",
             f"| RoPE theta / RMSNorm eps | {m.rope_theta:g} / {m.norm_eps:g} |",
             f"| tied input/output embeddings | {'yes' if m.tie_embeddings else 'no'} |",
             f"| tokenizer | {tok_desc} (`{tokenizer_file_name(tok)}`) |"]
    if fmt == "gguf":
        lines.append(f"| file | `{gguf_name}` (GGUF, llama.cpp architecture `llama`, tokenizer embedded) |")
    return lines + [""]


def _training_section(ck, source: dict, imported: bool) -> list[str]:
    """## Training: where an imported model came from, or the run's steps, tokens, time and final losses."""
    lines = ["## Training", ""]
    if imported:
        src_file = Path(source.get("file", "?")).name
        return lines + [f"Imported from a [llama2.c](https://github.com/karpathy/llama2.c) checkpoint (`{src_file}`, "
                        f"version {source.get('version')}), trained by its author on TinyStories; no training here.",
                        ""]
    state = ck.state
    metrics = state.get("metrics") or {}
    secs = training_time_s(ck.path, ck.step)
    data = ck.cfg.data.source or f"`tinystories data fetch` ({DATASET})"
    return lines + ["| | |", "| --- | --- |",
                    f"| data | {data} |",
                    f"| steps | {ck.step:,} |",
                    f"| tokens seen | {int(state.get('tokens') or 0):,} |",
                    f"| training time | {_fmt(secs / 60 if secs is not None else None, '{:.1f} min')} |",
                    f"| final validation loss | {_fmt(metrics.get('val_loss'))} per token |",
                    f"| final validation bits per byte | {_fmt(metrics.get('val_bpb'))} |",
                    f"| optimizer / peak lr / batch | AdamW / {ck.cfg.train.lr:g} / "
                    f"{state.get('global_batch', '-')} sequences |",
                    ""]


def _eval_section(ck, eval_json: str | None) -> list[str]:
    """## Evaluation, when an `eval --json` report for this checkpoint exists."""
    rep, rep_path = find_eval_report(ck.path, eval_json)
    if not rep:
        return []
    return (["## Evaluation", "", f"`tinystories eval` report ({rep_path.name}, step {rep.get('step', '-')}):", ""]
            + _eval_table(rep) + [""])


def _sample_section(model, tok) -> list[str]:
    story, how = _sample_story(model, tok)
    quoted = [f"> {line}" if line else ">" for line in story.splitlines()]
    return ["## Sample", "", f"Prompt `{SAMPLE_PROMPT}`, {how}:", "", *quoted, ""]


def _use_hf(where: str) -> list[str]:
    return ["transformers:", "", "```python",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            f"tok = AutoTokenizer.from_pretrained({where!r})",
            f"model = AutoModelForCausalLM.from_pretrained({where!r})",
            f"ids = tok({SAMPLE_PROMPT!r}, return_tensors=\"pt\").input_ids  # start-of-story token first",
            "out = model.generate(ids, max_new_tokens=200, do_sample=True, temperature=0.8, top_k=50,",
            "                     top_p=0.95)",
            "print(tok.decode(out[0], skip_special_tokens=True))", "```", "",
            "llama.cpp / Ollama / LM Studio: export a GGUF with this toolkit (below), or convert this folder with "
            "llama.cpp's `convert_hf_to_gguf.py`.", ""]


def _use_gguf(gguf_name: str, repo_id: str | None) -> list[str]:
    hub = f"\n# or straight from the Hub:\nllama-cli -hf {repo_id} -p \"{SAMPLE_PROMPT}\"" if repo_id else ""
    stem = Path(gguf_name).stem
    return ["llama.cpp:", "", "```sh", f"llama-cli -m {gguf_name} -p \"{SAMPLE_PROMPT}\" -n 256" + hub,
            "```", "", "Ollama (the Modelfile is in this repository):", "", "```sh",
            f"ollama create {stem} -f {stem}.Modelfile",
            f"ollama run {stem} \"{SAMPLE_PROMPT}\"", "```", "",
            "Python (llama-cpp-python):", "", "```python", "from llama_cpp import Llama",
            f"llm = Llama({gguf_name!r})",
            f"print(llm({SAMPLE_PROMPT!r}, max_tokens=200)[\"choices\"][0][\"text\"])", "```", ""]


def _use_section(fmt: str, where: str, repo_id: str | None, gguf_name: str | None) -> list[str]:
    """## Use it: transformers or llama.cpp/Ollama/Python code, then the toolkit's own commands."""
    lines = ["## Use it", ""] + (_use_hf(where) if fmt == "hf" else _use_gguf(gguf_name, repo_id))
    return lines + ["With the tinystories toolkit, from the checkpoint this was exported from:", "", "```sh",
                    f"tinystories generate --checkpoint RUN --prompt \"{SAMPLE_PROMPT}\"",
                    "tinystories export --format gguf --checkpoint RUN --out model.gguf      # llama.cpp, Ollama",
                    "tinystories export --format hf --checkpoint RUN --out model-hf          # transformers", "```",
                    ""]


def export_name(ck_path: Path) -> str:
    """The name an export gets when no Hub repository names it: its run's, else the checkpoint directory's."""
    return (run_dir_of(ck_path) or ck_path).name


def model_card(model, ck, *, fmt: str = "hf", repo_id: str | None = None, gguf_name: str | None = None,
               eval_json: str | None = None) -> str:
    """README.md for an export of checkpoint `ck` (fmt "hf": a transformers folder; "gguf": GGUF file `gguf_name`)."""
    n_params = model.num_params()
    source = ck.state.get("source") or {}
    imported = source.get("format") == "llama2c"
    lines = _metadata(repo_id or export_name(ck.path), n_params, fmt, imported)
    lines += _model_section(model.cfg, n_params, ck.tokenizer, fmt, gguf_name)
    lines += _training_section(ck, source, imported)
    lines += _eval_section(ck, eval_json)
    lines += _sample_section(model, ck.tokenizer)
    lines += _use_section(fmt, repo_id or "PATH/TO/EXPORT", repo_id, gguf_name)
    return "\n".join(lines + LIMITATIONS)


# ------------------------------------------------------------------------------------------------ push


def check_repo_id(repo_id: str) -> None:
    """Checked before any export work: OWNER/NAME."""
    if not REPO_ID.match(repo_id) or len(repo_id) > 96 or ".." in repo_id or repo_id.endswith((".git", "-", ".")):
        raise UserError(f"--push-to-hub {repo_id}: a Hub repository is OWNER/NAME (letters, digits, '-', '_', '.'), "
                        f"e.g. --push-to-hub your-name/tinystories-15m")


def _hub_error(e: BaseException, repo_id: str, endpoint: str) -> UserError:
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    if isinstance(e, OfflineModeIsEnabled):
        return UserError(f"--push-to-hub {repo_id}: offline mode is on (HF_HUB_OFFLINE=1); unset it to push")
    if isinstance(e, HfHubHTTPError) and getattr(e, "response", None) is not None:
        code = e.response.status_code
        if code == 401:
            return UserError(f"--push-to-hub {repo_id}: unauthenticated: {endpoint} rejected the token (401); set a "
                             f"valid HF_TOKEN or run `hf auth login`")
        if code == 403:
            return UserError(f"--push-to-hub {repo_id}: forbidden: the token may not write to {repo_id} (403; a "
                             f"read-only token, or another user's or organisation's namespace)")
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        return UserError(f"--push-to-hub {repo_id}: the Hub refused ({code}): {first}")
    if isinstance(e, (ConnectionError, TimeoutError, OSError)) or type(e).__module__.startswith(("httpx", "requests")):
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:120]
        return UserError(f"--push-to-hub {repo_id}: offline: cannot reach the Hub at {endpoint} ({first})")
    raise e


def check_push(repo_id: str) -> None:
    """What can be known before any work: the repository id, offline mode, a token at all."""
    from huggingface_hub import constants, get_token

    check_repo_id(repo_id)
    if constants.HF_HUB_OFFLINE:
        raise UserError(f"--push-to-hub {repo_id}: offline mode is on (HF_HUB_OFFLINE=1); unset it to push")
    if not get_token():
        raise UserError(f"--push-to-hub {repo_id}: unauthenticated: no Hugging Face token; set HF_TOKEN or run "
                        f"`hf auth login` (a token with write access)")


def push_to_hub(folder: Path, repo_id: str, private: bool = False, revision: str | None = None,
                message: str = "Upload with tinystories export") -> str:
    """Create `repo_id` if needed and upload every file of `folder` in one commit; returns the commit URL."""
    from huggingface_hub import HfApi, constants

    check_push(repo_id)
    endpoint = constants.ENDPOINT
    api = HfApi()
    try:
        api.create_repo(repo_id, private=True if private else None, exist_ok=True)  # None: the namespace default
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), revision=revision, commit_message=message)
    except Exception as e:  # huggingface_hub / httpx errors: one line saying which
        raise _hub_error(e, repo_id, endpoint) from None
    return str(info.commit_url)
