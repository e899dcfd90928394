"""Generation speed on CPU: tokens/s with and without the KV cache, batch 1 and 8, and against transformers.

    python benchmarks/generate_speed.py                      # cpu-sized and 23M seed configs
    python benchmarks/generate_speed.py --vs-transformers    # also HF LlamaForCausalLM.generate, same weights
    python benchmarks/generate_speed.py --vs-llama-cpp --skip-cache-bench   # ours in each precision vs llama.cpp

--vs-llama-cpp: for the quickstart shape (dim 256 x 6, 4K vocab) and the seed's 23M shape (dim 448 x 7, 10K
vocab), random weights exported to GGUF (f32 and q8_0, `tinystories export --format gguf`'s writer), llama.cpp
(llama-cpp-python, in a child process: native code that crashes takes only the child) against our compiled
decoding in float32, bfloat16 (where the CPU has it natively) and int8; batch 1, greedy, the same prompt ids and
length, --threads each (default 2), interleaved rounds, best of --repeats. Then how each precision moves bits per
byte and greedy text on stories260K (imported from ../shared) and the validation head.

--vs-transformers times our sampler twice: eager (the default of `tinystories generate`) and with compiled
one-token steps (`generate --compile`, `serve --compile`: model/exported_step.compile_for_decoding, ahead of time
with AOTInductor on a CPU; `TINYSTORIES_AOT=0` times torch.compile's step instead); the compile time is printed, not
hidden, and is excluded from tokens/s as HF's warm-up is. The last line is the compiled speedup.

Random weights, greedy decoding, a ~150-token prompt plus 256 new tokens (~400 tokens of context; a 256-token
context gets a 64-token prompt and 192 new). Without the cache, sampling.sample(use_cache=False) recomputes the
whole sequence for every new token; to keep the run short only the last --no-cache-tokens (32) positions are
timed that way (a prompt of context-32 tokens, then 32 new ones), i.e. at ~400 tokens of context.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tinystories.core.config import ModelConfig  # noqa: E402
from tinystories.inference.sampling import SamplingParams, sample  # noqa: E402
from tinystories.model.exported_step import compile_for_decoding  # noqa: E402
from tinystories.model.transformer import Transformer  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared"
QUICKSTART_SHAPE = dict(vocab_size=4096, dim=256, n_layers=6, n_heads=8, max_seq_len=512)
SEED_CONFIG = dict(vocab_size=10000, dim=448, n_layers=7, n_heads=7, hidden_dim=1408, max_seq_len=512)
CPU_CONFIG = dict(vocab_size=4096, dim=256, n_layers=6, n_heads=8, max_seq_len=256)


def cpu_config() -> tuple[str, dict]:
    path = Path(__file__).resolve().parents[1] / "configs" / "cpu.yaml"
    if path.is_file():
        import yaml

        m = (yaml.safe_load(path.read_text()) or {}).get("model", {}) or {}
        cfg = {**CPU_CONFIG, **{k: v for k, v in m.items() if k in ModelConfig.model_fields}}
        if not cfg.get("vocab_size"):
            cfg["vocab_size"] = CPU_CONFIG["vocab_size"]
        return "cpu (configs/cpu.yaml)", cfg
    return "cpu", CPU_CONFIG


def build(cfg: dict, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig(**cfg)).eval()


def lengths(model: Transformer, prompt_len: int, new: int) -> tuple[int, int]:
    """(prompt, new) tokens; a context too short for both keeps a quarter for the prompt (no sliding window)."""
    ctx = model.cfg.max_seq_len
    if prompt_len + new > ctx:
        prompt_len = ctx // 4
        new = ctx - prompt_len
    return prompt_len, new


def prompt_for(model: Transformer, prompt_len: int, batch: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    row = torch.randint(3, model.cfg.vocab_size, (prompt_len,), generator=g).tolist()
    return [row] * batch


def time_ours(model, prompts, new: int, use_cache: bool) -> tuple[float, list[int]]:
    params = SamplingParams(max_new_tokens=new, temperature=0.0)
    t = time.perf_counter()
    toks = [int(s.tokens[0]) for s in sample(model, prompts, params, use_cache=use_cache)]
    dt = time.perf_counter() - t
    assert len(toks) == new
    return len(prompts) * new / dt, toks


def compile_step(model: Transformer) -> Transformer:
    """`model` with its one-token step compiled as `generate --compile` compiles it."""
    compile_for_decoding(model)
    return model


def compile_seconds(compiled: Transformer, prompts: list[list[int]]) -> float:
    """Seconds of a first short generation with a compile_decoding() model: its step gets compiled."""
    t = time.perf_counter()
    time_ours(compiled, prompts, 8, True)
    return time.perf_counter() - t


def bench_config(name: str, cfg: dict, args) -> None:
    model = build(cfg)
    compiled = compile_step(build(cfg))
    n_params = model.num_params() / 1e6
    plen, new = lengths(model, args.prompt_tokens, args.new_tokens)
    for batch in (1, 8):
        prompts = prompt_for(model, plen, batch)
        time_ours(model, prompts, 8, True)  # warm-up
        compile_s = compile_seconds(compiled, prompts)  # one graph for batch 1, one for larger batches
        cached, a = time_ours(model, prompts, new, True)
        fast, _ = time_ours(compiled, prompts, new, True)
        n_nc = min(new, args.no_cache_tokens)
        ctx = plen + new
        long_prompts = prompt_for(model, ctx - n_nc, batch)
        uncached, b = time_ours(model, long_prompts, n_nc, False)
        _, b_cached = time_ours(model, long_prompts, n_nc, True)
        same = "same tokens" if b_cached == b else "TOKENS DIFFER"
        print(f"{name:24} {n_params:5.1f}M  batch {batch}  context {ctx:3d}  kv-cache {cached:7.1f} tok/s  "
              f"compiled {fast:7.1f} tok/s ({compile_s:4.1f}s to compile)  "
              f"no-cache (last {n_nc}) {uncached:6.1f} tok/s  "
              f"cache speedup {cached / uncached:5.1f}x  ({same})", flush=True)


def vs_transformers(args) -> float:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM

    from tinystories.data.tokenizer import load_tokenizer
    from tinystories.export.hf import export_hf

    model = build(SEED_CONFIG)
    plen, new = lengths(model, args.prompt_tokens, args.new_tokens)
    prompts = prompt_for(model, plen, 1)
    with tempfile.TemporaryDirectory() as tmp:
        tok_path = _seed_tokenizer(Path(tmp))
        export_hf(model, load_tokenizer(tok_path), Path(tmp) / "hf")
        hf = AutoModelForCausalLM.from_pretrained(str(Path(tmp) / "hf"), dtype=torch.float32).eval()
    x = torch.tensor(prompts)
    mask = torch.ones_like(x)

    def run_hf(n, **kwargs):
        with torch.inference_mode():
            return hf.generate(x, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                               use_cache=True, pad_token_id=0, **kwargs)

    run_hf(8)
    time_ours(model, prompts, 8, True)
    torch._dynamo.reset()  # compile from scratch (inductor's on-disk cache still applies), as a new process would
    compiled = compile_step(build(SEED_CONFIG))  # the same weights (same seed), its own compiled step
    compile_s = compile_seconds(compiled, prompts)
    best = {"transformers": 0.0, "eager": 0.0, "compiled": 0.0}
    tokens = {}
    for _ in range(args.repeats):  # interleaved, best of each: the fairest figure on a shared machine
        t = time.perf_counter()
        out = run_hf(new)
        best["transformers"] = max(best["transformers"], new / (time.perf_counter() - t))
        tokens["transformers"] = out[0, x.size(1):].tolist()
        for name, m in (("eager", model), ("compiled", compiled)):
            tps, tokens[name] = time_ours(m, prompts, new, True)
            best[name] = max(best[name], tps)
    hf_tps = best["transformers"]
    for name in ("eager", "compiled"):
        same = "same greedy tokens" if tokens[name] == tokens["transformers"] else "greedy tokens differ"
        extra = f", compiling took {compile_s:.1f}s once" if name == "compiled" else ""
        print(f"seed 23M batch 1, {new} new tokens: tinystories {name} {best[name]:.1f} tok/s, "
              f"transformers {hf_tps:.1f} tok/s, speedup {best[name] / hf_tps:.2f}x ({same}{extra})")
    if args.hf_compiled:  # transformers' own fast path: a static cache and torch.compile of the forward
        hf.forward = torch.compile(hf.forward, options={"cpp_wrapper": True})
        t = time.perf_counter()
        run_hf(new, cache_implementation="static")  # compiles (for this cache length)
        hf_compile_s = time.perf_counter() - t
        best_hfc = 0.0
        for _ in range(args.repeats):
            t = time.perf_counter()
            run_hf(new, cache_implementation="static")
            best_hfc = max(best_hfc, new / (time.perf_counter() - t))
        print(f"transformers static cache + torch.compile {best_hfc:.1f} tok/s (compiling took {hf_compile_s:.1f}s): "
              f"tinystories compiled is {best['compiled'] / best_hfc:.2f}x, eager {best['eager'] / best_hfc:.2f}x")
    return best["compiled"] / hf_tps


def breakdown(args) -> None:
    """Where a batch-1 step of the seed shape goes: the weight matrix-vector products alone, then a whole step."""
    model = build(SEED_CONFIG)
    weights = [p for n, p in model.named_parameters() if p.dim() == 2 and "tok_embeddings" not in n]
    weights.append(model.output.weight)  # tied with the embedding, read once per step by the output layer
    xs = {w.shape[1]: torch.randn(1, w.shape[1]) for w in weights}

    def per_call_ms(fn, n=200) -> float:
        for _ in range(10):
            fn()
        t = time.perf_counter()
        for _ in range(n):
            fn()
        return (time.perf_counter() - t) / n * 1e3

    def step_ms(m) -> float:
        cache = m.new_cache(1)
        m.decode(torch.randint(3, m.cfg.vocab_size, (1, 150)), cache)
        tok = torch.tensor([[5]])

        def one():
            m.decode(tok, cache)
            cache.length -= 1  # stay at position 150
        return per_call_ms(one)

    with torch.inference_mode():
        gemv = min(per_call_ms(lambda: [torch.nn.functional.linear(xs[w.shape[1]], w) for w in weights])
                   for _ in range(3))
        mb = sum(w.numel() for w in weights) * 4 / 1e6
        eager = min(step_ms(model) for _ in range(3))
        compiled = compile_step(build(SEED_CONFIG))
        step_ms(compiled)
        fast = min(step_ms(compiled) for _ in range(3))
    print(f"seed 23M batch 1 step at position 150: {len(weights)} weight matrix-vector products alone {gemv:.2f} ms "
          f"({mb:.0f} MB, {mb / gemv:.0f} GB/s); eager step {eager:.2f} ms; compiled step {fast:.2f} ms")


def _bpe_tokenizer(tmp: Path, vocab_size: int):
    """A byte-level BPE trained on the shared train head, padded with unused tokens to exactly `vocab_size` (the
    2 MB text runs out of merges near 8K; the GGUF needs a vocabulary as large as the model's)."""
    from tinystories.data.prepare import train_tokenizer
    from tinystories.data.tokenizer import load_tokenizer

    out = tmp / f"tok{vocab_size}"
    out.mkdir()
    train_tokenizer(SHARED / "data" / "tinystories" / "TinyStories-train-head.txt", vocab_size, out, None)
    tok = load_tokenizer(out)
    if tok.vocab_size < vocab_size:  # a new file: the trained one's recorded checksum stays true
        tok.tok.add_tokens([f"<unused{i}>" for i in range(vocab_size - tok.vocab_size)])
        padded = tmp / f"tok{vocab_size}-padded"
        padded.mkdir()
        tok.tok.save(str(padded / "tokenizer.json"))
        tok = load_tokenizer(padded)
    assert tok.vocab_size == vocab_size, tok.vocab_size
    return tok


def _llama_cpp_child(req_path: str, out_path: str) -> None:
    """Child process: load a GGUF in llama.cpp, greedy-decode n_new tokens after the prompt ids, best of repeats."""
    import json

    import llama_cpp

    req = json.loads(Path(req_path).read_text())
    llm = llama_cpp.Llama(model_path=req["gguf"], n_ctx=len(req["prompt"]) + req["n_new"] + 8,
                          n_threads=req["threads"], n_threads_batch=req["threads"], verbose=False, seed=0)

    def run(n: int) -> tuple[float, list[int]]:
        ids, t = [], time.perf_counter()
        for tok in llm.generate(req["prompt"], temp=0.0, repeat_penalty=1.0, reset=True):
            ids.append(int(tok))
            if len(ids) == n:
                return n / (time.perf_counter() - t), ids
        raise AssertionError("llama.cpp stopped early")

    run(8)
    best, ids = max(run(req["n_new"]) for _ in range(req["repeats"]))
    Path(out_path).write_text(json.dumps({"tps": best, "ids": ids,
                                          "system": llama_cpp.llama_print_system_info().decode().strip()}))


def _llama_cpp(gguf: Path, prompt: list[int], new: int, threads: int, repeats: int = 1) -> dict:
    """tokens/s and greedy ids of llama.cpp on `gguf`, run in a child process; {"error": ...} when it dies."""
    import json
    import signal
    import subprocess

    req, out = gguf.with_suffix(".req.json"), gguf.with_suffix(".out.json")
    req.write_text(json.dumps({"gguf": str(gguf), "prompt": prompt, "n_new": new, "threads": threads,
                               "repeats": repeats}))
    try:
        r = subprocess.run([sys.executable, __file__, "--llama-child", str(req), str(out)], capture_output=True,
                           text=True, timeout=600)
    except subprocess.TimeoutExpired:
        return {"error": "timed out after 600 s"}
    if r.returncode != 0:
        why = signal.Signals(-r.returncode).name if r.returncode < 0 else f"exit {r.returncode}"
        return {"error": f"crashed ({why}): {(r.stderr.strip().splitlines() or [''])[-1][:120]}"}
    return json.loads(out.read_text())


def _ours(cfg: dict, name: str):
    """The model in precision `name` (model/precision.py), its one-token step compiled and warmed up."""
    from tinystories.model.precision import Precision, apply_precision

    model = apply_precision(build(cfg), Precision(name))
    return compile_step(model)


def vs_llama_cpp_shape(label: str, cfg: dict, args, tmp: Path) -> None:
    from tinystories.export.gguf import write_gguf
    from tinystories.model.device import cpu_has_bf16

    model = build(cfg)
    tok = _bpe_tokenizer(tmp, cfg["vocab_size"])
    ggufs = {}
    for dtype in ("f32", "q8_0"):
        ggufs[dtype] = tmp / f"{cfg['dim']}-{dtype}.gguf"
        write_gguf(model, tok, ggufs[dtype], dtype)
    prompt = prompt_for(model, args.prompt_tokens, 1)
    new = args.new_tokens
    names = ["float32", *(["bfloat16"] if cpu_has_bf16() else []), "int8"]
    ours = {}
    for name in names:
        t = time.perf_counter()
        ours[name] = _ours(cfg, name)
        time_ours(ours[name], prompt, 8, True)
        print(f"  {label}: {name} compiled in {time.perf_counter() - t:.0f}s", flush=True)
    best: dict[str, float] = {}
    ids: dict[str, list[int]] = {}
    errors: dict[str, str] = {}
    shown = ""
    for _ in range(args.repeats):  # interleaved rounds: machine load hits every side alike
        for dtype, path in ggufs.items():
            if dtype in errors:
                continue
            r = _llama_cpp(path, prompt[0], new, args.threads)
            if r.get("system") and r["system"] != shown:  # llama.cpp's build decides its kernels, not torch's limits
                shown = r["system"]
                print(f"  llama.cpp's kernels: {shown}", flush=True)
            if "error" in r:
                errors[dtype] = r["error"]
                continue
            best[f"llama.cpp {dtype}"] = max(best.get(f"llama.cpp {dtype}", 0.0), r["tps"])
            ids[f"llama.cpp {dtype}"] = r["ids"]
        for name, m in ours.items():
            tps, ids[name] = time_ours(m, prompt, new, True)
            best[name] = max(best.get(name, 0.0), tps)
    ref = best.get("llama.cpp f32")
    print(f"| {label} | " + " | ".join(f"{k} {v:.0f}" for k, v in best.items()) + " |")
    for name in names:
        vs = f", {best[name] / ref:.2f}x llama.cpp f32" if ref else ""
        q8 = best.get("llama.cpp q8_0")
        vs8 = f", {best[name] / q8:.2f}x llama.cpp q8_0" if q8 else ""
        same = "same greedy tokens as float32" if ids[name] == ids["float32"] else "greedy tokens differ from float32"
        print(f"{label}: ours {name} {best[name]:.1f} tok/s{vs}{vs8} ({same})", flush=True)
    for dtype in ggufs:
        key = f"llama.cpp {dtype}"
        if key in best:
            same = "same greedy tokens as ours float32" if ids[key] == ids["float32"] else "greedy tokens differ"
            print(f"{label}: {key} {best[key]:.1f} tok/s ({same})", flush=True)
        else:
            print(f"{label}: {key} {errors[dtype]}", flush=True)


def precision_fidelity(args, tmp: Path) -> None:
    """bits per byte and greedy text of each precision against float32, on stories260K and the validation head."""
    import subprocess

    from tinystories.core.defaults import OPENINGS
    from tinystories.inference.generate import fidelity
    from tinystories.model.checkpoint import load_model
    from tinystories.model.precision import GREEDY_TOKENS, Precision, apply_precision

    models = SHARED / "models" / "llama2c-stories260K"
    ck_dir = tmp / "stories260K"
    subprocess.run([sys.executable, "-m", "tinystories", "import", "llama2c", str(models / "stories260K.bin"),
                    "--tokenizer", str(models / "tok512.model"), "--out", str(ck_dir)], check=True,
                   capture_output=True)
    text = (SHARED / "data" / "tinystories" / "TinyStories-valid-head.txt").read_text(encoding="utf-8")
    reference, ck = load_model(ck_dir, "cpu")
    for name in ("bfloat16", "int8"):
        model = apply_precision(load_model(ck_dir, "cpu")[0], Precision(name))
        f = fidelity(reference, model, ck.tokenizer, list(OPENINGS), text, args.bpb_tokens, GREEDY_TOKENS)
        print(f"stories260K {name}: bits per byte {f['bpb']:.4f} vs float32 {f['bpb_float32']:.4f} "
              f"({100 * f['bpb_change']:+.3f}%) on the first {args.bpb_tokens} tokens of the validation head; greedy "
              f"equal to float32 for {GREEDY_TOKENS} tokens on {f['greedy_equal']} of {len(OPENINGS)} openings "
              f"(tokens before the first difference: {f['greedy_same_tokens']})", flush=True)


def vs_llama_cpp(args) -> None:
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        for label, cfg in (("quickstart shape 5.9M", QUICKSTART_SHAPE), ("seed 23M shape", SEED_CONFIG)):
            if args.only in (None, "cpu" if cfg is QUICKSTART_SHAPE else "seed"):
                vs_llama_cpp_shape(label, cfg, args, Path(tmp))
        if not args.skip_fidelity:
            precision_fidelity(args, Path(tmp))


def _seed_tokenizer(tmp: Path) -> Path:
    """A tokenizer.json with exactly 10,000 entries (the export needs one; its merges do not matter here)."""
    from tokenizers import Tokenizer, models

    vocab = {"<|endoftext|>": 0, **{f"t{i}": i for i in range(1, SEED_CONFIG["vocab_size"])}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    path = tmp / "tokenizer.json"
    tok.save(str(path))
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompt-tokens", type=int, default=150)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--no-cache-tokens", type=int, default=32,
                    help="new tokens timed without the cache, at the end of the context (default 32)")
    ap.add_argument("--repeats", type=int, default=3, help="--vs-transformers: best of this many runs each")
    ap.add_argument("--only", choices=["cpu", "seed"], default=None, help="benchmark one config only")
    ap.add_argument("--vs-transformers", action="store_true", help="also time HF transformers generate (seed config)")
    ap.add_argument("--hf-compiled", action="store_true",
                    help="with --vs-transformers: also time transformers with a static cache and torch.compile")
    ap.add_argument("--breakdown", action="store_true",
                    help="also time a batch-1 step against its weight matrix-vector products alone (seed shape)")
    ap.add_argument("--vs-llama-cpp", action="store_true",
                    help="ours in float32/bfloat16/int8 against llama.cpp f32/q8_0 on the same weights")
    ap.add_argument("--threads", type=int, default=2, help="--vs-llama-cpp: threads for both sides (default 2)")
    ap.add_argument("--bpb-tokens", type=int, default=65536,
                    help="--vs-llama-cpp: validation-head tokens scored for the bits-per-byte change (default 65536)")
    ap.add_argument("--skip-fidelity", action="store_true", help="--vs-llama-cpp: speed only")
    ap.add_argument("--llama-child", nargs=2, metavar=("REQUEST", "OUT"), help=argparse.SUPPRESS)
    ap.add_argument("--skip-cache-bench", action="store_true",
                    help="skip the cache table: only --vs-transformers and/or --breakdown")
    args = ap.parse_args()
    if args.llama_child:
        return _llama_cpp_child(*args.llama_child)
    print(f"load: {os.getloadavg()[0]:.1f} (1-minute average), {os.cpu_count()} CPUs; {_cpu_kind()}", flush=True)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU, fp32, greedy", flush=True)
    if not args.skip_cache_bench:
        name, cfg = cpu_config()
        if args.only in (None, "cpu"):
            bench_config(name, cfg, args)
        if args.only in (None, "seed"):
            bench_config("seed 23M", SEED_CONFIG, args)
    if args.breakdown:
        breakdown(args)
    if args.vs_transformers:
        print(f"speedup_vs_transformers={vs_transformers(args):.2f}")
    if args.vs_llama_cpp:
        vs_llama_cpp(args)
        print(f"load: {os.getloadavg()[0]:.1f} (1-minute average) at the end", flush=True)


def _cpu_kind() -> str:
    from tinystories.model.calibrate import cpu_name
    from tinystories.model.device import cpu_bf16_feature

    limit = os.environ.get("ONEDNN_MAX_CPU_ISA")
    return (f"{cpu_name()}, native bf16: {cpu_bf16_feature() or 'none'}"
            + (f", ONEDNN_MAX_CPU_ISA={limit}" if limit else ""))


if __name__ == "__main__":
    main()
