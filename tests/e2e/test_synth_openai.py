"""`gazal synth` through the OpenAI-compatible path against a real vLLM server (the CPU build) that
this module starts on 127.0.0.1 (its own port, stopped at the end), with a fault-injecting
proxy in front of it: 429s, 500s, replies slower than the client's timeout and dropped
connections reach the client, which retries them; the run completes and its report counts
exactly the faults the proxy injected.

Also: strict validation rejects every answer of the random tiny model, retries it, and records
each attempt with its reason; a run killed with SIGKILL mid-chunk resumes (as two shards and a
--finalize) and ends with every example index exactly once, the chunks finished before the
kill untouched, and no partial file read or left behind.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from gazal_nemo.cli import main

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "recipes" / "tiny_cpu_synth.yaml"
SERVED_NAME = "tiny"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    from gazal_nemo.testing.tiny import make_tiny_qwen3

    return make_tiny_qwen3(tmp_path_factory.mktemp("teacher"), seed=0, head_dim=32, max_position_embeddings=2048)


@pytest.fixture(scope="module")
def vllm_server(teacher_dir, tmp_path_factory):
    """`python -m vllm.entrypoints.openai.api_server` on a free port of 127.0.0.1; its base URL."""
    port = _free_port()
    log = tmp_path_factory.mktemp("vllm_server") / "server.log"
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", VLLM_NO_USAGE_STATS="1", VLLM_ENABLE_V1_MULTIPROCESSING="1")
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(teacher_dir),
           "--served-model-name", SERVED_NAME, "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
           "--max-model-len", "2048", "--enforce-eager", "--no-enable-chunked-prefill", "--max-num-seqs", "16",
           "--seed", "0", "--gpu-memory-utilization", "0.25", "--uvicorn-log-level", "warning"]
    with open(log, "w") as handle:
        # its own session: the server's engine process is stopped with it (by this group's id)
        server = subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.time() + 300
        while True:
            try:
                with urllib.request.urlopen(url + "/models", timeout=2) as reply:
                    if SERVED_NAME in reply.read().decode():
                        break
            except OSError:
                pass
            if server.poll() is not None or time.time() > deadline:
                raise AssertionError(f"vLLM server did not start (exit {server.poll()}):\n{log.read_text()[-4000:]}")
            time.sleep(1)
        yield url
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()


class FaultProxy:
    """A real HTTP proxy to the vLLM server that turns some requests into faults.

    Chat request n (counted from 0) is answered by the server unless faults[n % len(faults)]
    says otherwise: "429" (Retry-After: 0), "500", "timeout" (held past the client's timeout,
    then answered by the server anyway), "drop" (connection closed, no reply). `delay` holds
    every request that long first (a slow endpoint, for the kill test)."""

    def __init__(self, upstream: str, faults=(), hold_s: float = 2.0, delay: float = 0.0):
        self.upstream, self.faults, self.hold_s, self.delay = upstream, list(faults), hold_s, delay
        self.injected, self.count, self.lock = Counter(), 0, threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                self._forward(None)

            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with proxy.lock:
                    number = proxy.count
                    proxy.count += 1
                fault = proxy.faults[number % len(proxy.faults)] if proxy.faults else None
                time.sleep(proxy.delay)
                if fault is not None:
                    with proxy.lock:
                        proxy.injected[fault] += 1
                if fault in ("429", "500"):
                    raw = b'{"error": {"message": "injected"}}'
                    self.send_response(int(fault))
                    if fault == "429":
                        self.send_header("Retry-After", "0")
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(raw)))
                    self.end_headers()
                    self.wfile.write(raw)
                    return
                if fault == "drop":
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if fault == "timeout":
                    time.sleep(proxy.hold_s)
                self._forward(body)

            def _forward(self, body):
                request = urllib.request.Request(proxy.upstream + self.path.removeprefix("/v1"), data=body,
                                                 headers={"Content-Type": "application/json"},
                                                 method="POST" if body is not None else "GET")
                try:
                    with urllib.request.urlopen(request, timeout=120) as reply:
                        code, raw = reply.status, reply.read()
                except urllib.error.HTTPError as error:
                    code, raw = error.code, error.read()
                try:
                    self.send_response(code)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(raw)))
                    self.end_headers()
                    self.wfile.write(raw)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client timed out and left

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def _overrides(out: Path, base_url: str, *extra: str) -> list[str]:
    return [f"output_dir={out}", "generator.backend=openai", f"generator.model={SERVED_NAME}",
            f"generator.openai.base_url={base_url}", *extra]


def _data_rows(out: Path) -> list[dict]:
    return [json.loads(line) for path in sorted((out / "data").glob("*.jsonl")) for line in path.read_text().splitlines()]


def test_retries_through_a_faulty_proxy_end_to_end(vllm_server, tmp_path, capsys):
    from gazal_nemo.data.prompts import SFT_SYSTEM_PROMPT
    from gazal_nemo.synth.attributes import draw_attributes
    from gazal_nemo.synth.config import load_synth_recipe

    # The client's timeout is far above a real reply's time (so the proxy's other faults reach it
    # as themselves even on a loaded machine); an injected timeout holds the reply past it.
    proxy = FaultProxy(vllm_server, faults=["429", None, "500", None, "timeout", None, "drop", None, None], hold_s=6.0)
    out = tmp_path / "run"
    overrides = _overrides(out, proxy.url, "num_examples=8", "generator.openai.timeout_s=5.0",
                           "generator.openai.max_retries=6", "generator.openai.max_concurrency=3")
    try:
        code = main(["synth", "--recipe", str(RECIPE), *overrides])
    finally:
        proxy.close()
    printed = capsys.readouterr()
    assert code == 0, printed.err[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert all(proxy.injected[kind] >= 1 for kind in ("429", "500", "timeout", "drop")), proxy.injected
    retries = report["throughput"]["backend"]
    assert (retries["retries/429"], retries["retries/5xx"], retries["retries/connection"]) == \
        (proxy.injected["429"], proxy.injected["500"], proxy.injected["drop"])
    # a real reply slower than the timeout (a very loaded machine) is one more timeout, never fewer
    assert retries["retries/timeout"] >= proxy.injected["timeout"]
    assert retries["requests"] == proxy.count and "failed" not in retries
    rows = _data_rows(out)
    recipe = load_synth_recipe(RECIPE, overrides)
    acceptance = report["acceptance"]
    assert acceptance["examples"] == 8 and acceptance["kept"] + acceptance["failed"] == 8
    assert report["final_rows"] == len(rows) == acceptance["kept"] - report["dedup"]["exact"] - report["dedup"]["near"]
    for row in rows:
        assert row["attributes"] == draw_attributes(recipe.design, recipe.seed, row["index"]).to_json()
        assert [m["role"] for m in row["messages"]] == ["system", "user", "assistant"]
        assert row["messages"][0]["content"] == SFT_SYSTEM_PROMPT
        assert row["messages"][1]["content"] == row["case"] and row["messages"][2]["content"] == row["generation"]
        assert row["validation"]["response"]["passed"] is False  # recorded, not enforced (a random model)
    assert (out / "rates.svg").read_text().startswith("<svg") and "## Attribute rates" in (out / "report.md").read_text()


def test_strict_validation_rejects_retries_and_records_every_attempt(vllm_server, tmp_path, capsys):
    out = tmp_path / "strict"
    code = main(["synth", "--recipe", str(RECIPE), *_overrides(
        out, vllm_server, "num_examples=4", "validation.enforce=true", "validation.max_retries=1",
        # cases pass (any non-empty text), so the answers are what is judged
        "validation.min_case_words=0", "validation.max_case_words=null", "validation.allow_truncated=true")])
    assert code == 0, capsys.readouterr().err[-3000:]
    report = json.loads((out / "report.json").read_text())
    records = [json.loads(line) for line in (out / "rejected.jsonl").read_text().splitlines()]
    failed = [r for r in records if r["type"] == "example"]
    attempts = [r for r in records if r["type"] == "rejected"]
    assert sorted(r["index"] for r in failed) == [0, 1, 2, 3] and report["final_rows"] == 0
    assert report["acceptance"]["kept"] == 0 and report["acceptance"]["rejected_attempts"] == len(attempts) == 8
    assert Counter(r["index"] for r in attempts) == {0: 2, 1: 2, 2: 2, 3: 2}  # 1 + validation.max_retries each
    answers = [r for r in attempts if r["stage"] == "response"]
    assert all(any(reason.startswith("no_think_block") for reason in r["reasons"]) for r in answers)
    assert all(r["prompt"][0]["role"] == "system" and "reason in this order" in r["prompt"][0]["content"]
               for r in answers)
    assert sum(report["acceptance"]["rejection_reasons"].get("response/no_think_block", {}).values()) == len(answers)


def test_kill_9_mid_run_then_resume_as_two_shards(vllm_server, tmp_path, capsys, monkeypatch):
    from gazal_nemo.synth.chunks import chunk_path

    out = tmp_path / "killed"
    overrides = _overrides(out, "PROXY", "num_examples=16", "generator.openai.max_concurrency=2")
    proxy = FaultProxy(vllm_server, delay=0.3)
    command = [sys.executable, "-m", "gazal_nemo.cli", "synth", "--recipe", str(RECIPE),
               *[o.replace("PROXY", proxy.url) for o in overrides]]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS")}
    victim = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 240
        while not chunk_path(out, 1).is_file():
            assert victim.poll() is None and time.time() < deadline, victim.communicate()[0][-3000:]
            time.sleep(0.05)
        time.sleep(0.4)  # into the next chunk's requests
        victim.send_signal(signal.SIGKILL)
        victim.wait()
    finally:
        if victim.poll() is None:
            victim.kill()
        proxy.close()
    done_before = {p.name: p.read_bytes() for p in sorted((out / "chunks").glob("chunk-*.jsonl"))}
    assert 2 <= len(done_before) < 4 and not (out / "data").exists()
    partials = list((out / "chunks").glob(".chunk-*.partial"))
    assert partials, "the chunk in flight left its partial file"
    code = main(["synth", "--recipe", str(RECIPE), *[o.replace("PROXY", vllm_server) for o in overrides],
                 "--finalize"])
    assert code == 2 and "chunks are not generated yet" in capsys.readouterr().err  # partials are not chunks
    resumed = [o.replace("PROXY", vllm_server) for o in overrides]
    for shard in (0, 1):  # resumed as two shards (the chunk layout does not depend on the shard count)
        monkeypatch.setenv("RANK", str(shard))
        monkeypatch.setenv("WORLD_SIZE", "2")
        assert main(["synth", "--recipe", str(RECIPE), *resumed]) == 0, capsys.readouterr().err[-3000:]
    printed = capsys.readouterr().out
    assert "once every shard is: gazal synth" in printed and not (out / "data").exists()
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    assert main(["synth", "--recipe", str(RECIPE), *resumed, "--finalize"]) == 0, capsys.readouterr().err[-3000:]
    for name, content in done_before.items():
        assert (out / "chunks" / name).read_bytes() == content, f"{name} was generated again"
    assert not list((out / "chunks").glob(".chunk-*")) and not list((out / "locks").iterdir())
    from gazal_nemo.synth.config import load_synth_recipe
    from gazal_nemo.synth.finalize import read_all_chunks

    examples = read_all_chunks(load_synth_recipe(RECIPE, resumed), out)[0]
    assert sorted(e["index"] for e in examples) == list(range(16))
    rows = _data_rows(out)
    failed = [json.loads(line) for line in (out / "rejected.jsonl").read_text().splitlines()]
    removed = [r for r in failed if r["type"] in ("example", "removed")]
    assert sorted([r["index"] for r in rows] + [r["index"] for r in removed]) == list(range(16))
