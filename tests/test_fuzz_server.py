"""Fuzzing ``kiln serve`` from its own OpenAPI schema (schemathesis): bodies that fit the
schema and bodies that break it (wrong types, huge and negative numbers, missing and
unknown fields), then raw bytes no schema describes (invalid UTF-8, deep nesting,
giant numbers). Every body gets a 2xx, or a 4xx in OpenAI's error format, never a 5xx;
afterwards the server runs no sequence, holds no block and has not grown."""

import json

import httpx
import psutil
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from live_server import AUTH, completion, live_server

from kiln.runtime import RuntimeConfig
from kiln.runtime.admission import ServerLimits

EXAMPLES = 200  # per (route, mode): 4 x 200 schema bodies + 200 raw ones, about 1,000 in all
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
BODIES: list[int] = []  # status codes seen, for the count


@pytest.fixture(scope="module")
def server(bundled_engine):
    # a short timeout bounds the cost of a body that asks for many tokens (408 is a 4xx)
    with live_server(bundled_engine, RuntimeConfig(num_blocks=256, max_num_seqs=8),
                     ServerLimits(request_timeout=0.05, max_body_bytes=1 << 20)) as live:
        completion(live.url, prompt="warm up")
        rss = psutil.Process().memory_info().rss
        yield live
        assert live.leaked_blocks() == 0 and not live.engine.sequences and live.engine.num_running == 0
        assert live.app.state.admission.admitted == 0 and live.llm.health().live
        grown = (psutil.Process().memory_info().rss - rss) / 2**20
        print(f"{len(BODIES)} fuzzed bodies: {sorted(set(BODIES))} status codes; resident memory grew {grown:.0f} MiB")
        assert grown < 200


@pytest.fixture(scope="module")
def schema(server):
    return schemathesis.openapi.from_dict(httpx.get(f"{server.url}/openapi.json", headers=AUTH, timeout=10).json())


def _check(response: httpx.Response | object) -> None:
    status = response.status_code
    BODIES.append(status)
    assert status < 500, (status, response.text[:500])
    if status >= 400:
        error = json.loads(response.text)["error"]
        assert isinstance(error["message"], str) and error["message"] and error["type"], error


@pytest.fixture(scope="module")
def session():
    with requests.Session() as opened:
        yield opened


@pytest.fixture(scope="module")
def client():
    with httpx.Client(timeout=30, headers={**AUTH, "content-type": "application/json"}) as opened:
        yield opened


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
@pytest.mark.parametrize("mode", [schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE])
def test_schema_bodies_never_get_a_server_error(server, schema, session, path, mode):
    @FUZZ
    @given(schema[path]["POST"].as_strategy(generation_mode=mode))
    def fuzz(case):
        _check(case.call(base_url=server.url, session=session, headers=AUTH, timeout=30))

    fuzz()


_json = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
                     lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                max_size=4), max_leaves=20)
_raw = st.one_of(
    st.binary(max_size=256),  # mostly invalid UTF-8
    st.builds(lambda depth: b"[" * depth + b"]" * depth, st.integers(1, 20_000)),
    st.builds(lambda depth: b'{"prompt": ' + b"[" * depth + b"1" + b"]" * depth + b"}", st.integers(1, 20_000)),
    st.builds(lambda digits: b'{"prompt": "x", "max_tokens": 1' + b"0" * digits + b"}", st.integers(1, 100_000)),
    st.builds(lambda exponent: b'{"prompt": "x", "temperature": 1e' + str(exponent).encode() + b"}",
              st.integers(-400, 400)),
    st.builds(lambda body: json.dumps(body).encode(), _json),
    st.builds(lambda text: json.dumps({"prompt": text, "max_tokens": 1}).encode(), st.text(max_size=64)),
    st.builds(lambda role, content: json.dumps({"messages": [{"role": role, "content": content}]}).encode(),
              st.text(max_size=12), st.text(max_size=32)),
)


@FUZZ
@given(path=st.sampled_from(["/v1/completions", "/v1/chat/completions"]), body=_raw)
def test_raw_bodies_never_get_a_server_error(server, client, path, body):
    _check(client.post(f"{server.url}{path}", content=body))
