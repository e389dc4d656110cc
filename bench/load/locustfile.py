"""The load profile of ``kiln serve`` (locust): a mix of streaming and non-streaming
completions and chats, short and long prompts, and clients that give up mid-stream.

Every request is checked: one that the server accepted must end with its full result
(``max_tokens`` tokens, since it ignores EOS, and a finish reason) or with an error in
OpenAI's format; a 429 is a refusal, counted apart. Time to first token and the time
between tokens are measured on the streams. At the end, one JSON report goes to
``$KILN_LOAD_REPORT``. ``$KILN_LOAD_REQUESTS`` bounds the requests (the run also
stops at locust's ``--run-time``), ``$KILN_API_KEY`` is the bearer token,
``$KILN_LONG_PROMPT_TOKENS`` the length of a long prompt (default 200).

Run it through ``bench/load/run.py``, which starts the server and locust and prints the report.
"""

from __future__ import annotations

import json
import os
import random
import statistics
import time

import gevent
from locust import HttpUser, events, task
from locust.exception import StopUser

REQUESTS = int(os.environ.get("KILN_LOAD_REQUESTS", "200"))
LONG = int(os.environ.get("KILN_LONG_PROMPT_TOKENS", "200"))
HEADERS = {"authorization": f"Bearer {os.environ.get('KILN_API_KEY', '')}"}
WORDS = "the for statement iterates over the items of any sequence in order while a loop runs".split()


class Tally:
    """What the run saw, across all users (one process: gevent greenlets)."""

    def __init__(self):
        self.started = 0
        self.outcomes: dict[str, int] = {}
        self.errors: dict[str, int] = {}  # message -> count, so that a report says what failed
        self.tokens = 0
        self.ttft: list[float] = []
        self.itl: list[float] = []
        self.first: float | None = None
        self.last: float | None = None

    def claim(self) -> None:
        """Take one request of the budget, or stop the user when it is spent."""
        if self.started >= REQUESTS:
            raise StopUser()
        self.started += 1
        self.first = self.first or time.monotonic()

    def end(self, outcome: str, tokens: int = 0, message: str | None = None) -> None:
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1
        if message is not None:
            self.errors[message] = self.errors.get(message, 0) + 1
        self.tokens += tokens
        self.last = time.monotonic()
        if sum(self.outcomes.values()) == REQUESTS and RUNNER:
            gevent.spawn_later(0, RUNNER[0].quit)  # the budget is spent and every request has ended

    def report(self) -> dict:
        seconds = max((self.last or 0) - (self.first or 0), 1e-9)
        done = self.outcomes.get("complete", 0) + self.outcomes.get("gave_up", 0)
        return {"requests": self.started, "seconds": round(seconds, 2), "outcomes": self.outcomes,
                "requests_per_second": round(done / seconds, 2),
                "output_tokens_per_second": round(self.tokens / seconds, 1),
                "ttft_ms": _percentiles(self.ttft), "itl_ms": _percentiles(self.itl),
                "errors": dict(sorted(self.errors.items(), key=lambda item: -item[1])[:10])}


def _percentiles(values: list[float]) -> dict:
    if len(values) < 2:
        return {}
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return {"p50": round(cuts[49] * 1e3, 2), "p90": round(cuts[89] * 1e3, 2), "p99": round(cuts[98] * 1e3, 2)}


TALLY = Tally()
RUNNER: list = []


@events.test_start.add_listener
def _keep_runner(environment, **_):
    RUNNER.append(environment.runner)


@events.quitting.add_listener
def _write_report(environment, **_):
    report = TALLY.report()
    path = os.environ.get("KILN_LOAD_REPORT")
    if path:
        with open(path, "w") as out:
            json.dump(report, out, indent=2)
    print(json.dumps(report))


def _prompt(rng: random.Random) -> str:
    length = LONG if rng.random() < 0.25 else rng.randint(2, 12)
    return " ".join(rng.choice(WORDS) for _ in range(length))


class KilnClient(HttpUser):
    """One client: each task is one request of the mix."""

    def on_start(self):
        self.rng = random.Random(id(self))

    def _body(self, chat: bool, stream: bool) -> tuple[str, dict, int]:
        max_tokens = self.rng.randint(8, 48)
        body = {"model": "tiny", "max_tokens": max_tokens, "temperature": self.rng.choice([0, 0.8]),
                "ignore_eos": True, "stream": stream}
        if chat:
            return "/v1/chat/completions", {**body, "messages": [{"role": "user", "content": _prompt(self.rng)}]}, \
                max_tokens
        return "/v1/completions", {**body, "prompt": _prompt(self.rng)}, max_tokens

    @task(3)
    def stream(self):
        self._stream(chat=self.rng.random() < 0.3, give_up_after=None)

    @task(3)
    def whole(self):
        TALLY.claim()
        path, body, max_tokens = self._body(chat=self.rng.random() < 0.3, stream=False)
        with self.client.post(path, json=body, headers=HEADERS, catch_response=True, name=path) as response:
            if response.status_code == 200:
                usage = response.json()["usage"]["completion_tokens"]
                self._end(response, "complete" if usage == max_tokens else "incomplete", usage)
            else:
                self._refused_or_error(response)

    @task(1)
    def give_up(self):
        self._stream(chat=False, give_up_after=self.rng.randint(1, 4))

    def _stream(self, chat: bool, give_up_after: int | None):
        TALLY.claim()
        path, body, max_tokens = self._body(chat, stream=True)
        start = last = time.perf_counter()
        tokens, finish = 0, None
        with self.client.post(path, json=body, headers=HEADERS, stream=True, catch_response=True,
                              name=f"{path} (stream)") as response:
            if response.status_code != 200:
                return self._refused_or_error(response)
            for line in response.iter_lines():
                if not line.startswith(b"data: ") or line == b"data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return self._end(response, "error", tokens, chunk["error"].get("message", str(chunk["error"])))
                now = time.perf_counter()
                (TALLY.ttft if tokens == 0 else TALLY.itl).append(now - (start if tokens == 0 else last))
                last = now
                tokens += 1  # the server sends a chunk per step of the request: one token
                finish = chunk["choices"][0]["finish_reason"] or finish
                if give_up_after is not None and tokens >= give_up_after:
                    return self._end(response, "gave_up", tokens)
            self._end(response, "complete" if finish == "length" else "incomplete", tokens)

    def _refused_or_error(self, response):
        try:
            message = response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            return self._end(response, "incomplete")
        if response.status_code == 429:
            self._end(response, "refused")
            response.success()
        else:
            self._end(response, "error", message=f"{response.status_code}: {message}")

    @staticmethod
    def _end(response, outcome: str, tokens: int = 0, message: str | None = None):
        TALLY.end(outcome, tokens, message)
        if outcome in ("incomplete", "error"):
            response.failure(message or outcome)
