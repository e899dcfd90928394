"""Grammar measured by a real English parser: CMU Link Grammar's `link-parser` (LGPL; Debian/Ubuntu and Homebrew
package `link-grammar`), asked for every sentence whether a *complete* linkage exists (no skipped words).

One long-running `link-parser` process in batch mode per worker reads one sentence per line from a pipe (a
writer thread feeds it while the caller reads the verdicts), so a story costs milliseconds, not a process start
per sentence. Each sentence gets one verdict: PARSED (a complete linkage exists), FAILED (none; also sentences
longer than MAX_WORDS words, which are not sent), or TIMED_OUT (the parser's own timer expired, or it gave no
answer within the watchdog time and was killed and restarted). Sentences come from `story_stats.sentences`,
the one sentence splitter of the project (`"Hi," said Tom.` is one sentence).

The output protocol, found by trying link-parser 5.12 (`echo ... | link-parser en -batch ...`): with `echo` on,
every input line is printed back first; with the test feature `batch-print-parse-statistics` a sentence that
parses prints one `Found N linkages ...` line, one that does not prints `+++++ error N`, and `Timer is expired!`
comes before it when the time limit cut the parse short. Sentences are sent with a leading space, so their echo
is told apart from every other line and no sentence can be read as a `!command`, a `%comment` or batch mode's
`*` (expected to fail) label. A fixed sentence (SYNC) follows every batch: its echo marks the end of the last real
sentence even if that one printed nothing (a tokenizer failure), and it is the start-up check. stderr (the
library's warnings) is drained by a thread into a short tail for error messages and never mixed into the verdicts.
"""

from __future__ import annotations

import math
import os
import queue
import shutil
import subprocess
import threading
import time
from collections import deque
from collections.abc import Sequence

from tinystories.core.errors import UserError

PARSED, FAILED, TIMED_OUT = "parsed", "failed", "timed_out"
INSTALL_HINT = "install link-grammar (apt-get install link-grammar / brew install link-grammar)"
NOT_MEASURED = f"not measured: {INSTALL_HINT}"
EXECUTABLE = "link-parser"
DEFAULT_TIME_LIMIT = 2.0  # seconds per sentence; real TinyStories sentences take ~5 ms
# Longest sentence sent to the parser. The longest of the 15,245 sentences of the shared valid head has 35 words;
# link-parser's time grows fast with length (a 242-word run-on took 19 s with timeout=1) and a line over 2,046
# bytes is a fatal error that ends the process.
MAX_WORDS = 60
MAX_LINE_BYTES = 2000
SCORE_GOOD = 8.0  # the table shows the share of stories whose grammar score (out of 10) is at least this
SYNC = "The dog ran."

# The verdict depends on these options, so they are pinned instead of taken from the installed version's defaults.
# Measured on the first 300 lines of the shared valid head (1,187 sentences): see docs/eval.md.
PARSER_OPTIONS = {
    # Post-processing (P.P.) rules are checked on at most `limit` linkages (a random sample when there are more);
    # a sentence parses only if one of them passes. Share of real sentences rejected: limit 1: 27%, 10: 7.4%,
    # 100: 6.6%, 1000: 6.4%, 10000: 6.4% (the same sentences as 1000, at 40% of the speed).
    "limit": "1000",
    "rand": "1",  # that random sample is repeatable: the same sentence always gets the same verdict
    "null": "0",  # a linkage that skips words ("null links") is not a parse
    "islands-ok": "0",  # nor one made of disconnected pieces
    "panic": "0",  # panic mode re-parses a timed-out sentence with null links and batch mode then calls it good
    "spell": "0",  # no spelling guesses (they depend on whether hunspell is installed); unknown words stay unknown
    "cost-max": "2.7",  # the library's default largest disjunct cost, pinned: a higher one accepts more
    "short": "16",  # the library's default maximum length of short links
    "batch": "1",  # no "Press RETURN" reads of the next line, no second parse with null links after a failure
    "echo": "1",  # every input line printed back: the reader checks it is in step with the writer
    "verbosity": "1",  # needed for "Timer is expired!"
    "graphics": "0",  # no linkage diagrams
    "test": "batch-print-parse-statistics",  # one "Found N linkages" line for each sentence that parses
}


class GrammarError(UserError):
    """link-parser is installed but does not work as expected (no dictionary, a crash at start-up)."""


def find_parser(executable: str = EXECUTABLE) -> str | None:
    """The path of link-parser on PATH, or None."""
    return shutil.which(executable)


def available() -> bool:
    return find_parser() is not None


def parser_line(sentence: str) -> str | None:
    """The line sent for `sentence` (whitespace folded, a leading space), or None when it is too long to send."""
    text = " ".join(sentence.replace("\x00", " ").split())
    if not text or len(text.split()) > MAX_WORDS or len(text.encode("utf-8")) > MAX_LINE_BYTES:
        return None
    return " " + text


class LinkParser:
    """One `link-parser` process; `check(sentences)` returns one verdict per sentence. Use as a context manager."""

    def __init__(self, time_limit: float = DEFAULT_TIME_LIMIT, options: dict | None = None,
                 executable: str | None = None):
        if not time_limit > 0:
            raise UserError(f"grammar time limit {time_limit}: must be > 0 seconds")
        self.time_limit = float(time_limit)
        self.options = {**PARSER_OPTIONS, "timeout": str(max(1, math.ceil(time_limit))), **(options or {})}
        self.executable = executable or find_parser()
        if self.executable is None:
            raise GrammarError(f"{EXECUTABLE} not found on PATH: {INSTALL_HINT}")
        # the parser checks its timer only now and then (a 1 s timeout once took 19 s): the watchdog kills it
        self.watchdog = 2 * self.time_limit + 3.0
        self.proc: subprocess.Popen | None = None
        self.restarts = 0

    # -------------------------------------------------------------------------------------------- process

    def start(self) -> None:
        args = [self.executable, "en", *(f"-{k}={v}" for k, v in self.options.items())]
        env = {**os.environ, "LC_ALL": "C.UTF-8"}  # the dictionary is UTF-8; a missing locale is only a warning
        try:
            self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                         encoding="utf-8", errors="replace", env=env)
        except OSError as e:
            raise GrammarError(f"cannot start {self.executable}: {e.strerror or e}") from None
        self._lines: queue.Queue = queue.Queue()
        self._stderr: deque = deque(maxlen=20)
        proc, lines, err = self.proc, self._lines, self._stderr

        def read_stdout():
            for line in proc.stdout:
                lines.put(line.rstrip("\n"))
            lines.put(None)

        def read_stderr():
            for line in proc.stderr:
                err.append(line.rstrip())

        threading.Thread(target=read_stdout, daemon=True).start()
        threading.Thread(target=read_stderr, daemon=True).start()
        out: list = [None]
        # start-up check: the dictionary loads and the SYNC sentence parses (allow for a slow, busy machine)
        if self._run([], out, first_wait=max(30.0, self.watchdog)) != 0 or self.proc is None:
            tail = "; ".join(self._stderr) or "no message"
            self.close()
            raise GrammarError(f"{self.executable} does not answer as expected ({tail}); {INSTALL_HINT}")

    def close(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        try:
            if proc.poll() is None:
                proc.stdin.close()
                proc.wait(timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            proc.kill()
            proc.wait()

    def _kill(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            proc.kill()
            proc.wait()

    def __enter__(self) -> LinkParser:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -------------------------------------------------------------------------------------------- parsing

    def check(self, sentences: Sequence[str]) -> list[str]:
        """PARSED / FAILED / TIMED_OUT for each sentence, in order."""
        out: list[str | None] = [None] * len(sentences)
        todo = []
        for i, s in enumerate(sentences):
            line = parser_line(s)
            if line is None:
                out[i] = FAILED
            else:
                todo.append((i, line))
        pos = 0
        while pos < len(todo):
            if self.proc is None:
                self.start()
            pos += self._run(todo[pos:], out)
        return out  # type: ignore[return-value]

    def _feed(self, lines: list[str]) -> None:
        """Write `lines` to the parser from a thread, while the caller reads the verdicts."""
        proc = self.proc

        def write():
            try:
                for k in range(0, len(lines), 64):
                    proc.stdin.write("".join(line + "\n" for line in lines[k : k + 64]))
                    proc.stdin.flush()
            except (OSError, ValueError):  # the process was killed or died: the reader sees it
                pass

        threading.Thread(target=write, daemon=True).start()

    def _give_up(self, items: list[tuple[int, str]], out: list, stuck: int, verdict: str) -> int:
        """Kill the process; the item it was on (`stuck`, the next one without a verdict) gets `verdict`. Returns
        how many items are done."""
        self._kill()
        self.restarts += 1
        if stuck < len(items):
            out[items[stuck][0]] = verdict
        return min(stuck + 1, len(items))

    def _run(self, items: list[tuple[int, str]], out: list, first_wait: float | None = None) -> int:
        """Send `items` and SYNC; fill `out`. Returns how many items got a verdict (all of them, unless the
        process had to be killed or died: then the item it was on is TIMED_OUT or FAILED and counted)."""
        expected = [line for _, line in items] + [" " + SYNC]
        self._feed(expected)
        k = 0  # the next echo expected
        current = None  # the item whose echo came last and that has no verdict yet
        timer = False
        deadline = time.monotonic() + (first_wait or self.watchdog)
        n = len(items)

        def verdict(v: str) -> None:
            nonlocal current, deadline
            if current is not None and current < n:
                out[items[current][0]] = v
            current = None
            deadline = time.monotonic() + self.watchdog

        while True:
            try:
                line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:  # no answer in time
                return self._give_up(items, out, current if current is not None else k, TIMED_OUT)
            if line is None:  # the process died (or closed its output)
                return self._give_up(items, out, current if current is not None else k, FAILED)
            if line.startswith(" "):  # an echo
                if k >= len(expected) or line != expected[k]:
                    self._kill()
                    raise GrammarError(f"{self.executable} output is out of step with its input "
                                       f"(expected {expected[k] if k < len(expected) else 'nothing'!r}, got {line!r})")
                if current is not None:  # the previous sentence printed no result: the parser could not read it
                    verdict(FAILED)
                current, timer = k, False
                k += 1
            elif line.startswith("Timer is expired"):
                timer = True
            elif line.startswith(("Found ", "+++++ error")) and current is not None:
                done = current
                verdict(PARSED if line.startswith("Found ") else TIMED_OUT if timer else FAILED)
                if done == n:
                    return n
            # anything else (start-up notes, "... set to ..." lines) is not a verdict


def check_sentences(sentences: Sequence[str], workers: int | None = None,
                    time_limit: float = DEFAULT_TIME_LIMIT, options: dict | None = None) -> list[str]:
    """Verdicts for many sentences, dealt out (sentence i to worker i mod workers) to `workers` processes that
    parse at once (default: min(2, CPU count); one per 50 sentences at most, as each costs a start-up)."""
    workers = max(1, min(workers or min(2, os.cpu_count() or 1), max(1, len(sentences) // 50)))
    parts = [list(range(len(sentences)))[w::workers] for w in range(workers)]
    out: list[str | None] = [None] * len(sentences)
    errors: list[BaseException] = []

    def work(idx: list[int]) -> None:
        try:
            with LinkParser(time_limit, options) as p:
                for i, v in zip(idx, p.check([sentences[i] for i in idx])):
                    out[i] = v
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            errors.append(e)

    threads = [threading.Thread(target=work, args=(part,)) for part in parts[1:]]
    for t in threads:
        t.start()
    work(parts[0])
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return out  # type: ignore[return-value]


# ------------------------------------------------------------------------------------------------ per story


def story_sentences(stories: Sequence[str]) -> list[list[str]]:
    from tinystories.evaluation.story_stats import sentences

    return [sentences(s) for s in stories]


def given_sentences(prompt: str, text: str) -> int:
    """How many leading sentences of a generated `text` the prompt wrote whole (they are not the model's grammar):
    all of the prompt's sentences when it ends with . ! or ?, else all but the last, which the model completed."""
    from tinystories.evaluation.story_stats import sentences

    if not prompt or not text.startswith(prompt):
        return 0
    ss = sentences(prompt)
    return len(ss) if ss and _terminated(ss[-1]) else max(0, len(ss) - 1)


def _terminated(sentence: str) -> bool:
    end = sentence.rstrip("\"”’') ")
    return bool(end) and end[-1] in ".!?"


def grammar_stats(stories: Sequence[str], skip: Sequence[int] | None = None, cut: Sequence[bool] | None = None,
                  workers: int | None = None, time_limit: float = DEFAULT_TIME_LIMIT, max_errors: int = 50) -> dict:
    """Link Grammar's verdict on every sentence of `stories`, less the first skip[i] sentences of story i (a
    prompt's) and, when cut[i] (generation stopped at the token limit), its unfinished last sentence. Without
    link-parser: {"grammar_measured": False, "grammar_note": NOT_MEASURED}. Rates (keys `grammatical_...`) are
    fractions; a story's grammar score is 10 x the share of its sentences that parse (a timed-out sentence did not
    parse; a story without sentences has no score)."""
    if not available():
        return {"grammar_measured": False, "grammar_note": NOT_MEASURED}
    per_story = story_sentences(stories)
    if cut is not None:
        per_story = [ss[:-1] if c and ss and not _terminated(ss[-1]) else ss for ss, c in zip(per_story, cut)]
    if skip is not None:
        per_story = [ss[k:] for ss, k in zip(per_story, skip)]
    flat = [s for ss in per_story for s in ss]
    t0 = time.time()
    verdicts = check_sentences(flat, workers, time_limit)
    seconds = time.time() - t0
    scores: list[float | None] = []
    errors: list[dict] = []
    pos = 0
    for i, ss in enumerate(per_story):
        vs = verdicts[pos : pos + len(ss)]
        pos += len(ss)
        scores.append(10.0 * sum(v == PARSED for v in vs) / len(vs) if vs else None)
        errors += [{"story": i, "sentence": s, "verdict": v} for s, v in zip(ss, vs) if v != PARSED]
    scored = [x for x in scores if x is not None]
    n = len(flat)
    return {
        "grammar_measured": True,
        "grammar_note": None,
        "grammar_sentences": n,
        "grammatical_sentences": sum(v == PARSED for v in verdicts) / n if n else None,
        "grammar_rejected": sum(v != PARSED for v in verdicts),
        "grammar_timed_out": sum(v == TIMED_OUT for v in verdicts),
        "grammatical_timed_out": sum(v == TIMED_OUT for v in verdicts) / n if n else None,
        "grammar_score_mean": sum(scored) / len(scored) if scored else None,
        "grammatical_stories": sum(x >= SCORE_GOOD for x in scored) / len(scored) if scored else None,
        "grammar_scores": scores,
        "grammar_errors": errors[:max_errors],
        "grammar_seconds": seconds,
    }


def sample_grammar_stats(samples: Sequence[dict], max_errors: int = 50) -> dict:
    """grammar_stats of generated samples ({"prompt", "text", "ended"} as sampling.generate_texts makes them): the
    prompt's whole sentences and the unfinished last sentence of a story cut at the token limit are not judged."""
    return grammar_stats([s["text"] for s in samples], skip=[given_sentences(s["prompt"], s["text"]) for s in samples],
                         cut=[not s["ended"] for s in samples], max_errors=max_errors)


# (key, label, format) for the table eval prints
GRAMMAR_ROWS = [
    ("grammatical_sentences", "grammatical sentences (parser)", "{:.1%}"),
    ("grammar_timed_out", "sentences timed out (parser)", "{:.0f}"),
    ("grammar_score_mean", "grammar score /10 (mean)", "{:.2f}"),
    ("grammatical_stories", f"stories with grammar score >= {SCORE_GOOD:.0f}", "{:.0%}"),
]


def format_rows(model: dict | None, reference: dict | None, width: int = 32) -> list[str]:
    """The grammar rows of eval's table (label, model, reference), or one `not measured` row; [] when not asked."""
    from tinystories.evaluation.story_stats import format_value

    model, reference = model or {}, reference or {}
    if not any("grammar_measured" in d for d in (model, reference)):
        return []
    if not any(d.get("grammar_measured") for d in (model, reference)):
        return [f"  {GRAMMAR_ROWS[0][1]:{width}} {NOT_MEASURED}"]
    return [f"  {label:{width}} {format_value(model.get(key), fmt):>10} {format_value(reference.get(key), fmt):>10}"
            for key, label, fmt in GRAMMAR_ROWS]


def format_errors(stories: Sequence[str], stats: dict | None, n: int, what: str = "generated stories") -> list[str]:
    """Up to `n` sentences the parser rejected, each under (the start of) the story it came from."""
    if not n or not stats or not stats.get("grammar_measured"):
        return []
    errors = stats["grammar_errors"][:n]
    if not errors:
        return [f"link-parser rejects no sentence of the {what}"]
    lines = [f"sentences link-parser rejects in the {what} ({len(errors)} of {stats['grammar_rejected']}; "
             f"{stats['grammar_sentences']} sentences judged):"]
    last = None
    for e in errors:
        if e["story"] != last:
            story = " ".join(stories[e["story"]].split())
            lines.append(f"  story {e['story'] + 1}: {story[:160] + ('...' if len(story) > 160 else '')}")
            last = e["story"]
        note = "  (timed out)" if e["verdict"] == TIMED_OUT else ""
        lines.append(f"    x {e['sentence']}{note}")
    return lines
