"""The OpenAI-compatible client against a real HTTP server on 127.0.0.1 that answers from a script:
429 (with and without Retry-After), 500, a reply slower than the timeout, a dropped connection,
a 200 that is not JSON; each is retried and the request then succeeds. A request that never
succeeds comes back failed; a 400 about the context is prompt_too_long; a 401 ends the run.
(The end-to-end test puts a fault-injecting proxy in front of a real vLLM server.)"""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from gazal_nemo.inference.protocol import SamplingSettings
from gazal_nemo.synth.config import OpenAIBackendConfig
from gazal_nemo.synth.openai_http import EndpointError, OpenAIChatBackend, check_endpoint, request_seed


def _completion(text="ok", finish="stop"):
    return {"choices": [{"message": {"role": "assistant", "content": text}, "finish_reason": finish}],
            "usage": {"prompt_tokens": 7, "completion_tokens": 3}}


class ScriptedServer:
    """Answers each POST with the next step of `script`; records the bodies and arrival times."""

    def __init__(self):
        self.script, self.bodies, self.times = [], [], []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                step = server.script.pop(0) if server.script else ("models", None)
                if step[0] == "status":
                    self.send_response(step[1])
                    self.end_headers()
                    return
                self._json(200, {"data": [{"id": "tiny"}]})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.bodies.append(body)
                server.times.append(time.monotonic())
                kind, value = server.script.pop(0) if server.script else ("ok", None)
                if kind == "ok":
                    self._json(200, _completion(value or f"reply {body['messages'][-1]['content']}"))
                elif kind == "status":
                    headers = {"Retry-After": "0.05"} if value == 429 else {}
                    self._json(value, {"error": {"message": "scripted"}}, headers)
                elif kind == "context":
                    self._json(400, {"error": {"message": "This model's maximum context length is 512 tokens."}})
                elif kind == "slow":
                    time.sleep(value)
                    self._json(200, _completion())
                elif kind == "drop":
                    self.connection.close()
                elif kind == "garbage":
                    self.send_response(200)
                    self.send_header("Content-Length", "9")
                    self.end_headers()
                    self.wfile.write(b"not json!")

            def _json(self, code, payload, headers=None):
                raw = json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(raw)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = ScriptedServer()
    yield s
    s.close()


def _backend(server, **settings):
    cfg = OpenAIBackendConfig(**{"base_url": server.url, "max_concurrency": 1, "timeout_s": 0.5, "max_retries": 6,
                                 "backoff_initial_s": 0.01, "backoff_max_s": 0.05, **settings})
    return OpenAIChatBackend(cfg, model="tiny", api_key="secret")


SAMPLING = SamplingSettings(max_new_tokens=5, temperature=1.0, top_k=20, top_p=0.9, seed=11)


def test_every_transient_fault_is_retried(server):
    server.script = [("status", 429), ("status", 500), ("status", 503), ("slow", 1.0), ("drop", None),
                     ("garbage", None), ("ok", "fine")]
    backend = _backend(server)
    try:
        [result] = backend.chat([[{"role": "user", "content": "case"}]], SAMPLING)
    finally:
        backend.close()
    assert (result.text, result.finish_reason, result.completion_tokens) == ("fine", "stop", 3)
    assert backend.stats() == {"requests": 7, "retries/429": 1, "retries/5xx": 2, "retries/timeout": 1,
                               "retries/connection": 1, "retries/bad_reply": 1}
    body = server.bodies[-1]
    assert body["model"] == "tiny" and body["max_tokens"] == 5 and body["top_k"] == 20 and body["top_p"] == 0.9
    assert body["seed"] == request_seed(11, 0) and all(b == body for b in server.bodies)  # a retry resends as it was


def test_exhausted_retries_fail_the_request_not_the_run(server):
    server.script = [("status", 502)] * 3
    backend = _backend(server, max_retries=2)
    try:
        [result] = backend.chat([[{"role": "user", "content": "case"}]], SAMPLING)
    finally:
        backend.close()
    assert result.finish_reason == "failed" and "3 attempts" in result.error and "HTTP 502" in result.error
    assert backend.stats()["failed"] == 1


def test_answers_in_order_with_per_position_seeds_and_a_rate_limit(server):
    backend = _backend(server, max_concurrency=4, requests_per_second=40)
    conversations = [[{"role": "user", "content": f"case {i}"}] for i in range(6)]
    try:
        results = backend.chat(conversations, SAMPLING)
    finally:
        backend.close()
    assert [r.text for r in results] == [f"reply case {i}" for i in range(6)]
    seeds = {b["messages"][0]["content"]: b["seed"] for b in server.bodies}
    assert seeds == {f"case {i}": request_seed(11, i) for i in range(6)}
    gaps = [b - a for a, b in zip(sorted(server.times), sorted(server.times)[1:])]
    assert min(gaps) > 0.02  # starts spaced 1/40 s apart (less scheduling jitter)


def test_refusals(server):
    backend = _backend(server)
    try:
        server.script = [("context", None)]
        [result] = backend.chat([[{"role": "user", "content": "long"}]], SAMPLING)
        assert result.finish_reason == "prompt_too_long"
        server.script = [("status", 401)]
        with pytest.raises(EndpointError, match="HTTP 401"):
            backend.chat([[{"role": "user", "content": "x"}]], SAMPLING)
    finally:
        backend.close()
    cfg = OpenAIBackendConfig(base_url=server.url)
    assert "model tiny" in check_endpoint(cfg, model="tiny", api_key=None)
    with pytest.raises(ValueError, match="generator.model='gemma' is not served by .*; served: tiny"):
        check_endpoint(cfg, model="gemma", api_key=None)
    server.script = [("status", 401)]
    with pytest.raises(ValueError, match="refused the key"):
        check_endpoint(cfg, model="tiny", api_key="wrong")
