"""The llama.cpp side of tests/test_gguf.py, in a child process: native code that dies (SIGILL from an instruction
the CPU lacks, SIGSEGV) takes this process with it, not pytest. Usage: python llama_cpp_child.py REQUEST.json OUT.json

REQUEST: {"gguf": path, "label": "f32", "n_ctx": int, "metadata": bool, "tokenize": [text] (no BOS, no specials),
"tokenize_bos": [text] (with BOS), "eval": [[token id]] (logits at every position, each saved as .npy beside OUT),
"greedy": {"prompt", "n_new"} (llama.cpp's own greedy sampler), "completion": {"prompt", "n_new"} (create_completion
at temperature 0), "die": {"stage", "signal"} (announce the stage, then kill this process with the signal: the
parent's crash handling under test; needs no llama_cpp)}. Each stage is announced on stderr, flushed, before it runs:
`stage: <label> <what>`; the parent names the last one when this process dies."""

from __future__ import annotations

import faulthandler
import json
import os
import signal
import sys
from pathlib import Path


def stage(label: str, what: str) -> None:
    print("stage:", *filter(None, (label, what)), file=sys.stderr, flush=True)


def die(how: dict) -> None:
    try:
        import resource

        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # no core file from a crash we cause on purpose
    except (ImportError, ValueError, OSError):
        pass
    stage("", how["stage"])
    os.kill(os.getpid(), signal.Signals[how["signal"]])


def main(request_path: str, out_path: str) -> None:
    faulthandler.enable()  # a Python traceback on stderr before a fatal signal ends this process
    req = json.loads(Path(request_path).read_text())
    out = Path(out_path)
    if req.get("die"):
        die(req["die"])
    res: dict = {}
    if req.get("gguf"):
        res = run(req, out)
    out.write_text(json.dumps(res))


def run(req: dict, out: Path) -> dict:
    import numpy as np

    label = req.get("label", "")
    stage(label, "import llama_cpp")
    import llama_cpp

    stage(label, "load")
    # an fp32 KV cache (llama.cpp's default is f16, which alone moves logits by ~1e-2) for an exact comparison
    n_ctx = req["n_ctx"]
    llm = llama_cpp.Llama(model_path=req["gguf"], n_ctx=n_ctx, n_threads=2, n_batch=n_ctx, logits_all=True,
                          verbose=False, seed=0, type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
    res: dict = {"n_vocab": llm.n_vocab(), "n_ctx": llm.n_ctx(), "token_bos": llm.token_bos()}
    if req.get("metadata"):
        res["metadata"] = dict(llm.metadata)
    if req.get("tokenize") or req.get("tokenize_bos"):
        stage(label, "tokenizer")
        res["tokenize"] = [llm.tokenize(t.encode(), add_bos=False, special=False) for t in req.get("tokenize", [])]
        res["tokenize_bos"] = [llm.tokenize(t.encode(), add_bos=True) for t in req.get("tokenize_bos", [])]
    res["scores"] = []
    for i, x in enumerate(req.get("eval", [])):
        stage(label, "logits")
        llm.reset()
        llm.eval(x)
        path = out.with_name(f"{out.stem}-scores{i}.npy")
        np.save(path, np.asarray(llm.scores[: len(x)], dtype=np.float32))
        res["scores"].append(str(path))
    if g := req.get("greedy"):
        stage(label, "greedy decoding")
        res["greedy"] = greedy(llama_cpp, llm, g["prompt"], g["n_new"])
    if c := req.get("completion"):
        stage(label, "completion")
        choice = llm.create_completion(c["prompt"], max_tokens=c["n_new"], temperature=0.0,
                                       repeat_penalty=1.0)["choices"][0]
        res["completion"] = {"text": choice["text"], "finish_reason": choice["finish_reason"]}
    stage(label, "done")
    return res


def greedy(llama_cpp, llm, prompt: str, n: int) -> dict:
    """llama.cpp's own greedy sampler; stops at what llama.cpp counts as end of generation."""
    ids: list[int] = []
    tokens = llm.tokenize(prompt.encode(), add_bos=True, special=False)
    for t in llm.generate(tokens, temp=0.0, repeat_penalty=1.0, reset=True):
        if llama_cpp.llama_vocab_is_eog(llm._model.vocab, t):
            return {"ids": ids, "end": True}
        ids.append(int(t))
        if len(ids) == n:
            return {"ids": ids, "end": False}
    raise AssertionError("generate() ended without a token")


if __name__ == "__main__":
    main(*sys.argv[1:3])
