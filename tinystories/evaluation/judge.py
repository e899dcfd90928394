"""The LLM judge of `tinystories eval`: an OpenAI chat-completions endpoint (`POST {url}/v1/chat/completions`)
grades each generated completion with the TinyStories paper's rubric: grammar, creativity, consistency with the
beginning, plot (1-10 each). Replies are read leniently (JSON alone, in a code fence or inside prose, else
"Grammar: 8/10" lines); a malformed reply is retried, an unreachable judge skips the grading with a reason and
never fails the evaluation. An API key is taken from $TINYSTORIES_JUDGE_API_KEY or $OPENAI_API_KEY.
"""

from __future__ import annotations

import http.client
import json
import math
import os
import re
import urllib.error
import urllib.request

JUDGE_RUBRIC = ("grammar", "creativity", "consistency", "plot")
JUDGE_RETRIES = 2


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
