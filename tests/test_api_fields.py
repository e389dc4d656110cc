"""No request field is silently ignored: every field of the request models is either
honoured, which a request that sets it shows (its response differs from the same request
without it, in the way the field says), or refused with a 400 that names it. The tables
below must list every pydantic field; a new field fails ``test_every_field_is_in_a_table``
until it gets a behavioural check or a refusal."""

import copy
import dataclasses
from collections.abc import Callable

import httpx
import pytest
from live_server import AUTH, live_server

from kiln.runtime.protocol import ChatMessage, ChatRequest, CompletionRequest

PROMPT = "The for statement is used to specify cleanup actions"
GREEDY = {"prompt": PROMPT, "max_tokens": 8, "temperature": 0}
SAMPLED = {"prompt": PROMPT, "max_tokens": 8, "temperature": 1.0, "seed": 3}
PENALIZED = {**GREEDY, "max_tokens": 24, "logprobs": 0}
FORCED_EOS = {**GREEDY, "logit_bias": {"0": 100}}  # token 0 is the bundled model's end of sequence
CHAT = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 8, "temperature": 0}
# a template that shows a message's name, otherwise the bundled one
TEMPLATE = ("{% for message in messages %}{{ message['role'] }}{% if message.get('name') %} ({{ message['name'] }})"
            "{% endif %}: {{ message['content'] }}\n{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}")


@dataclasses.dataclass(frozen=True)
class Honoured:
    """``base`` with ``change`` (a dict, or made from the base's response) gets a response
    that ``check(response, base_response)`` accepts."""

    base: dict
    change: dict | Callable[[dict], dict]
    check: Callable[[httpx.Response, dict], bool]


def _choice(response) -> dict:
    body = response if isinstance(response, dict) else response.json()
    return body["choices"][0]


def _text(response) -> str:
    choice = _choice(response)
    return choice["text"] if "text" in choice else choice["message"]["content"]


def _usage(response, kind: str = "completion_tokens") -> int:
    return response.json()["usage"][kind]


def _differs(response, base) -> bool:
    return response.status_code == 200 and _text(response) != _text(base)


def _scores_differ(response, base) -> bool:
    """Whether the text or the tokens' log-probabilities (those of the penalized logits) differ."""
    scores = [_choice(r)["logprobs"]["token_logprobs"] for r in (response, base)]
    return _differs(response, base) or max(abs(a - b) for a, b in zip(*scores)) > 1e-3


COMPLETION = {
    "prompt": Honoured(GREEDY, {"prompt": "A class definition"}, _differs),
    "model": Honoured(GREEDY, {"model": "gpt-4"}, lambda r, b: r.status_code == 404),
    "max_tokens": Honoured(GREEDY, {"max_tokens": 3}, lambda r, b: _usage(r) == 3),
    "temperature": Honoured(SAMPLED, {"temperature": 0.05}, _differs),
    "top_p": Honoured(SAMPLED, {"top_p": 0.05}, _differs),
    "top_k": Honoured(SAMPLED, {"top_k": 1}, _differs),
    "min_p": Honoured(SAMPLED, {"min_p": 0.9}, _differs),
    "seed": Honoured(SAMPLED, {"seed": 4}, _differs),
    "n": Honoured(GREEDY, {"n": 2}, lambda r, b: len(r.json()["choices"]) == 2),
    "stream": Honoured(GREEDY, {"stream": True}, lambda r, b: r.text.startswith("data: ") and "[DONE]" in r.text),
    "stop": Honoured(GREEDY, lambda b: {"stop": _text(b)[3:6]}, lambda r, b: _text(b).startswith(_text(r))
                     and len(_text(r)) <= 3 and _choice(r)["finish_reason"] == "stop"),
    "stop_token_ids": Honoured({**GREEDY, "logit_bias": {"42": 100}}, {"stop_token_ids": [42]},
                               lambda r, b: _choice(r)["finish_reason"] == "stop" and _usage(r) == 1),
    "presence_penalty": Honoured(PENALIZED, {"presence_penalty": 2.0}, _scores_differ),
    "frequency_penalty": Honoured(PENALIZED, {"frequency_penalty": 2.0}, _scores_differ),
    "repetition_penalty": Honoured({**SAMPLED, "max_tokens": 24}, {"repetition_penalty": 2.0}, _differs),
    "ignore_eos": Honoured(FORCED_EOS, {"ignore_eos": True}, lambda r, b: _usage(r) == 8 and _usage(r, "total_tokens")
                           > b["usage"]["total_tokens"]),
    "min_tokens": Honoured(FORCED_EOS, {"min_tokens": 3}, lambda r, b: _usage(r) == 4 and b["usage"]
                           ["completion_tokens"] == 1),
    "logit_bias": Honoured(GREEDY, {"logit_bias": {"42": 100}}, _differs),
    "logprobs": Honoured(GREEDY, {"logprobs": 2}, lambda r, b: len(_choice(r)["logprobs"]["top_logprobs"][0]) == 2
                         and _choice(b)["logprobs"] is None),
    "echo": Honoured(GREEDY, {"echo": True}, lambda r, b: _text(r) == PROMPT + _text(b)),
    "best_of": Honoured(SAMPLED, {"best_of": 3}, lambda r, b: _usage(r) == 3 * b["usage"]["completion_tokens"]),
}
CHAT_ONLY = {
    "messages": Honoured(CHAT, {"messages": [{"role": "user", "content": "A class"}]}, _differs),
    "logprobs": Honoured(CHAT, {"logprobs": True}, lambda r, b: len(_choice(r)["logprobs"]["content"]) == 8),
    "top_logprobs": Honoured({**CHAT, "logprobs": True}, {"top_logprobs": 2},
                             lambda r, b: len(_choice(r)["logprobs"]["content"][0]["top_logprobs"]) == 2),
    "max_completion_tokens": Honoured({k: v for k, v in CHAT.items() if k != "max_tokens"},
                                      {"max_completion_tokens": 3}, lambda r, b: _usage(r) == 3),
    "response_format": Honoured(CHAT, {"response_format": {"type": "text"}}, lambda r, b: _text(r) == _text(b)),
    "tool_choice": Honoured(CHAT, {"tool_choice": "none"}, lambda r, b: _text(r) == _text(b)),
}
MESSAGE = {  # a field of the chat message: the prompt changes
    "role": {"role": "system"},
    "content": {"content": "Hello there"},
    "name": {"name": "ada"},
}
REFUSED = [  # (route, field, value): refused with 400 naming the field
    ("completions", "suffix", "the end"),
    ("chat/completions", "response_format", {"type": "json_object"}),
    ("chat/completions", "tools", [{"type": "function", "function": {"name": "f"}}]),
    ("chat/completions", "tool_choice", "auto"),
    ("completions", "stream_options", {"include_usage": True}),  # not a field: unknown fields too
    ("completions", "frobnicate", 1),
    ("completions", "logit_bias", {"five": 10}),  # and a bad value of a field honoured
]
METADATA = {"user"}  # OpenAI: an end-user id for abuse monitoring; no effect on the output by definition


@pytest.fixture(scope="module")
def server(bundled_engine):
    tokenizer = copy.deepcopy(bundled_engine.tokenizer)
    tokenizer.chat_template = TEMPLATE
    with live_server(dataclasses.replace(bundled_engine, tokenizer=tokenizer)) as live:
        yield live


def _post(server, route: str, body: dict) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/{route}", json={"model": "tiny", **body}, headers=AUTH, timeout=60)


def test_every_field_is_in_a_table():
    refused = {field for _, field, _ in REFUSED}
    completion = set(COMPLETION) | refused | METADATA
    chat = set(COMPLETION) - {"prompt", "logprobs", "echo", "best_of"} | set(CHAT_ONLY) | refused | METADATA
    assert set(CompletionRequest.model_fields) <= completion, set(CompletionRequest.model_fields) - completion
    assert set(ChatRequest.model_fields) <= chat, set(ChatRequest.model_fields) - chat
    assert set(ChatMessage.model_fields) == set(MESSAGE)


@pytest.mark.parametrize("route, table, field", [
    *(("completions", COMPLETION, field) for field in COMPLETION),
    *(("chat/completions", CHAT_ONLY, field) for field in CHAT_ONLY),
])
def test_a_field_set_changes_the_response(server, route, table, field):
    case = table[field]
    base = _post(server, route, case.base)
    assert base.status_code == 200, base.text
    change = case.change(base.json()) if callable(case.change) else case.change
    response = _post(server, route, {**case.base, **change})
    assert case.check(response, base.json()), response.text


@pytest.mark.parametrize("field", MESSAGE)
def test_a_message_field_changes_the_prompt(server, field):
    base = _post(server, "chat/completions", CHAT)
    changed = _post(server, "chat/completions", {**CHAT, "messages": [{**CHAT["messages"][0], **MESSAGE[field]}]})
    assert _usage(changed, "prompt_tokens") != _usage(base, "prompt_tokens") or _text(changed) != _text(base)


@pytest.mark.parametrize("route, field, value", REFUSED)
def test_what_kiln_does_not_do_is_refused_by_name(server, route, field, value):
    body = {**(GREEDY if route == "completions" else CHAT), field: value}
    response = _post(server, route, body)
    assert response.status_code == 400 and field in response.json()["error"]["message"], response.text


def test_user_is_accepted_and_changes_nothing(server):
    assert _text(_post(server, "completions", {**GREEDY, "user": "u-1"})) == _text(_post(server, "completions",
                                                                                        GREEDY))
