"""Schema-driven fuzzing of `tinystories serve`: schemathesis generates requests for every operation in the
server's own OpenAPI schema, valid ones and (its negative mode) invalid ones, and sends them to a real uvicorn
server running stories260K with an API key; no answer may be a 5xx, and every answer must be what the schema
declares (status code, content type, body). benchmarks/chaos_serve.py runs the same fuzzer with more examples."""

from __future__ import annotations

from collections import Counter

import pytest

schemathesis = pytest.importorskip("schemathesis")
pytest.importorskip("fastapi")

from test_serve import HANG_S, Server  # noqa: E402

KEY = "fuzz-key"
EXAMPLES = 25  # per operation and mode: the file runs in well under a minute on 2 CPU cores


def fuzz(url: str, key: str | None, examples: int, seed: int = 0) -> dict:
    """Fuzz every operation of the server at `url` (its /openapi.json) in both modes, `examples` each, sending the
    key. {"requests": n, "statuses": Counter, "failures": ["METHOD PATH: what schemathesis found", ...]}."""
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as fixed_seed
    from hypothesis.errors import Unsatisfiable
    from schemathesis.checks import negative_data_rejection, positive_data_acceptance
    from schemathesis.core.failures import FailureGroup
    from schemathesis.generation import GenerationMode

    schema = schemathesis.openapi.from_url(url + "/openapi.json", wait_for_schema=HANG_S)
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    statuses: Counter = Counter()
    failures: list[str] = []

    def one(case) -> None:
        response = case.call(headers=headers, timeout=HANG_S)
        statuses[response.status_code] += 1
        # schema-valid requests may still be refused (422): a prompt's length in tokens is only known once it is
        # tokenized, and a prompt of 32,000 four-byte characters is over the body limit (413). A body over the limit
        # is refused with 413 before anything else is read, an invalid one too: a rejection schemathesis's list of
        # rejection statuses lacks
        excluded = [positive_data_acceptance] + ([negative_data_rejection] if response.status_code == 413 else [])
        try:
            case.validate_response(response, headers=headers, excluded_checks=excluded)
        except (FailureGroup, AssertionError) as e:
            failures.append(f"{case.method} {case.path} {response.status_code}: {str(e).strip()[:2000]}")

    for result in schema.get_all_operations():
        op = result.ok()
        for mode in GenerationMode:
            run = fixed_seed(seed)(settings(max_examples=examples, deadline=None, database=None,
                                            phases=[Phase.generate], suppress_health_check=list(HealthCheck))(
                given(case=op.as_strategy(generation_mode=mode))(one)))
            try:
                run()
            except Unsatisfiable:  # nothing invalid to send (an operation without parameters)
                pass
    return {"requests": sum(statuses.values()), "statuses": statuses, "failures": failures}


@pytest.fixture(scope="module")
def fuzz_server(s260):
    # --timeout 0.5: a generation the fuzzer asks 512 tokens of ends after half a second ("timeout"), so the
    # number of examples, not the sampled lengths, bounds the run
    s = Server(s260, "--no-compile", "--max-batch", "4", "--timeout", "0.5", "--api-key", KEY)
    try:
        yield s.wait()
    finally:
        s.stop()


def test_every_operation_answers_by_its_schema_and_never_5xx(fuzz_server):
    out = fuzz(fuzz_server.url, KEY, EXAMPLES)
    assert not out["failures"], "\n\n".join(out["failures"])
    assert not [s for s in out["statuses"] if s >= 500], out["statuses"]
    assert out["statuses"][200] > 0 and out["statuses"][422] > 0, out["statuses"]  # both modes reached the model
    assert "Traceback" not in fuzz_server.output()
