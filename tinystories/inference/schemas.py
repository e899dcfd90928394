"""The HTTP request bodies of `tinystories serve`: pydantic models, so FastAPI validates them (clear 422s) and
documents them in the OpenAPI schema. Numbers must be finite and strings valid Unicode."""

# no `from __future__ import annotations`: FastAPI resolves the route signatures' annotations at runtime
import re
from typing import Annotated

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StringConstraints

from tinystories.data.requests import CANDIDATES, WORD_BIAS
from tinystories.inference.params import SamplingParams

MAX_PROMPT_CHARS = 32_000
MAX_ALTERNATIVES = 5
MAX_STOPS = 4
MAX_CANDIDATES = 16
MAX_STOP_CHARS = 500  # each stop string: the hold-back scans it at every token

_DEFAULT = SamplingParams()  # the sampling defaults of every command


_SURROGATE = re.compile("[\ud800-\udfff]")


def _unicode(text):
    """JSON's \\uD800-style escapes can carry half of a surrogate pair, which is no character: refuse it."""
    bad = _SURROGATE.search(text) if isinstance(text, str) else None
    if bad:
        raise ValueError(f"not valid Unicode: a lone surrogate (\\u{ord(bad.group()):04x}) at character {bad.start()}")
    return text


Text = Annotated[str, BeforeValidator(_unicode)]  # every string field of a request
Stop = Annotated[str, StringConstraints(max_length=MAX_STOP_CHARS), BeforeValidator(_unicode)]


class GenerateRequest(BaseModel):
    """Continue a story. No field names a file: the server's checkpoint is fixed when it starts."""

    model_config = ConfigDict(extra="forbid")
    prompt: Text = Field("", max_length=MAX_PROMPT_CHARS, description="the start of the story (may be empty)")
    max_new_tokens: int = Field(200, ge=1, description="at most this many tokens; capped by the context")
    temperature: float = Field(_DEFAULT.temperature, allow_inf_nan=False, ge=0.0, le=5.0,
                               description="0 = greedy")
    top_k: int | None = Field(_DEFAULT.top_k, ge=0, le=1_000_000, description="0 or null = off")
    top_p: float | None = Field(_DEFAULT.top_p, allow_inf_nan=False, gt=0.0, le=1.0,
                                description="nucleus sampling; 1 or null = off")
    repetition_penalty: float = Field(_DEFAULT.repetition_penalty, allow_inf_nan=False, gt=0.0, le=10.0,
                                      description="1 = off")
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description="null = a fresh random seed")
    stream: bool = Field(False, description="server-sent events, one per token, then a final 'done' event")
    top_alternatives: int = Field(0, ge=0, le=MAX_ALTERNATIVES,
                                  description="with each token, its most likely alternatives and probabilities")
    stop: list[Stop] = Field(default_factory=list, max_length=MAX_STOPS, description="stop at any of these strings")
    words: list[Text] = Field(default_factory=list, max_length=3,
                              description="up to three words the story should use (a model trained on requests)")
    features: list[Text] = Field(default_factory=list, max_length=6,
                                 description="dialogue, badending, moralvalue, twist, foreshadowing, conflict")
    summary: Text = Field("", max_length=1000, description="what the story should be about, in a sentence")
    word_bias: float = Field(WORD_BIAS, allow_inf_nan=False, ge=0.0, le=20.0,
                             description="logit bonus for requested words not yet in the story (0 = off)")
    candidates: int = Field(1, ge=1, le=MAX_CANDIDATES,
                            description="with words or features, and without stream: draw this many stories and "
                                        "answer the one that meets most of the request and reads most naturally "
                                        f"(`generate` draws {CANDIDATES})")


class CompletionRequest(BaseModel):
    """The OpenAI completions request (the subset that makes sense for one small model)."""

    model_config = ConfigDict(extra="forbid")
    model: Text | None = Field(None, max_length=200, description="a label only, echoed back; never a path")
    prompt: Text | list[Text] = Field("", description="a string (or a list holding one string)")
    max_tokens: int | None = Field(16, ge=1)
    temperature: float | None = Field(1.0, allow_inf_nan=False, ge=0.0, le=2.0)
    top_p: float | None = Field(1.0, allow_inf_nan=False, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=1, description="only 1")
    stream: bool = False
    stream_options: dict | None = None
    stop: Stop | list[Stop] | None = None
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    user: Text | None = Field(None, max_length=200)
    echo: bool = Field(False, description="only false")
    logprobs: int | None = Field(None, ge=0, le=0, description="not supported (null or 0)")
    presence_penalty: float | None = Field(0.0, allow_inf_nan=False, ge=0.0, le=0.0,
                                           description="not supported (0 only)")
    frequency_penalty: float | None = Field(0.0, allow_inf_nan=False, ge=0.0, le=0.0,
                                            description="not supported (0 only)")
    # extra fields (the openai client's extra_body): a story on request, as in /v1/generate
    words: list[Text] = Field(default_factory=list, max_length=3, description="up to three words the story should use")
    features: list[Text] = Field(default_factory=list, max_length=6, description="features the story should have")
    summary: Text = Field("", max_length=1000, description="what the story should be about")
    word_bias: float = Field(WORD_BIAS, allow_inf_nan=False, ge=0.0, le=20.0,
                             description="logit bonus for requested words (0 = off)")
