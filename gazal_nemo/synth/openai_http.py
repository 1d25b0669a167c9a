"""The OpenAI-compatible chat backend: vLLM's server, NIM, a hosted API.

Standard library only (urllib in a thread pool): a request is seconds to minutes of
generation, so a thread per in-flight request costs nothing that matters, and no HTTP
library joins the dependencies.

* bounded concurrency: `max_concurrency` worker threads;
* a rate limit: request starts are spaced 1/requests_per_second apart across threads;
* retries: 429, any 5xx, a timeout, a refused or dropped connection and a 200 whose body is
  not the JSON it should be are retried up to `max_retries` times, after
  min(backoff_max_s, backoff_initial_s * 2^attempt) * U(0.5, 1.5) seconds, or the server's
  Retry-After when it sends one; a request that never succeeds comes back as
  finish_reason "failed" (its example is then retried as a rejected one);
* a 400 about the context length is "prompt_too_long"; any other 4xx (bad key, unknown
  model, a request field the server refuses) ends the run with one line: every other
  request would fail the same way;
* each request carries a seed derived from the call's seed and its position, as the
  engines on the inference protocol do, so servers that honour `seed` (vLLM) repeat a run.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import random
import socket
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from gazal_nemo.inference.protocol import SamplingSettings
from gazal_nemo.synth.chat import ChatResult

_CONTEXT_ERRORS = ("context length", "context_length", "maximum context", "too long", "max_model_len")


class EndpointError(ValueError):
    """A refusal that no retry can mend (bad key, unknown model, a refused field): ends the run."""


def request_seed(seed: int, index: int) -> int:
    """A well-mixed 31-bit seed for request `index` of a call seeded `seed`."""
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little") & 0x7FFFFFFF


def api_key(cfg) -> str | None:
    """The key from the environment variable the recipe names; ValueError naming it when unset."""
    if not cfg.api_key_env:
        return None
    key = os.environ.get(cfg.api_key_env)
    if not key:
        raise ValueError(f"generator.openai.api_key_env={cfg.api_key_env!r}: that environment variable is not set "
                         "(export it, or set api_key_env='' for an endpoint without a key)")
    return key


def _headers(key: str | None) -> dict[str, str]:
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    return headers


def _body_text(error: urllib.error.HTTPError) -> str:
    try:
        return " ".join(error.read().decode("utf-8", "replace").split())[:300]
    except Exception:
        return ""


def check_endpoint(cfg, *, model: str, api_key: str | None, timeout_s: float = 15.0) -> str:
    """GET {base_url}/models: refuse an endpoint that does not answer, a rejected key, a model it does not serve."""
    url = cfg.base_url.rstrip("/") + "/models"
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=_headers(api_key)), timeout=timeout_s) as reply:
            listing = json.loads(reply.read().decode("utf-8"))
    except urllib.error.HTTPError as e:
        if e.code in (401, 403):
            raise ValueError(f"generator.openai.base_url={cfg.base_url}: the endpoint refused the key "
                             f"(HTTP {e.code}; key from ${cfg.api_key_env or '(none)'})") from None
        if e.code == 404:  # some APIs have no /models listing: the first request will tell
            return f"openai endpoint {cfg.base_url} (no /models listing), model {model}"
        raise ValueError(f"generator.openai.base_url={cfg.base_url}: GET /models answered HTTP {e.code} "
                         f"{_body_text(e)}") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
        reason = getattr(e, "reason", e)
        raise ValueError(f"generator.openai.base_url={cfg.base_url}: unreachable ({reason}); is the server up?") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ValueError(f"generator.openai.base_url={cfg.base_url}: GET /models did not answer JSON; "
                         "is this an OpenAI-compatible endpoint (it usually ends in /v1)?") from None
    served = [m.get("id") for m in listing.get("data", []) if isinstance(m, dict)] if isinstance(listing, dict) else []
    if served and model not in served:
        raise ValueError(f"generator.model={model!r} is not served by {cfg.base_url}; served: {', '.join(served)}")
    return f"openai endpoint {cfg.base_url}, model {model}"


class _RateLimiter:
    """Spaces request starts at least 1/rate seconds apart, across threads (rate 0: no limit)."""

    def __init__(self, rate: float):
        self.interval = 1.0 / rate if rate > 0 else 0.0
        self.next_start = 0.0
        self.lock = threading.Lock()

    def wait(self) -> None:
        if not self.interval:
            return
        with self.lock:
            now = time.monotonic()
            start = max(now, self.next_start)
            self.next_start = start + self.interval
        if start > now:
            time.sleep(start - now)


class _Retry(Exception):
    def __init__(self, cause: str, detail: str, retry_after: float | None = None):
        super().__init__(detail)
        self.cause, self.detail, self.retry_after = cause, detail, retry_after


class OpenAIChatBackend:
    """Chat completions from an OpenAI-compatible endpoint (see the module docstring)."""

    name = "openai"

    def __init__(self, cfg, *, model: str, api_key: str | None):
        self.cfg, self.model = cfg, model
        self.url = cfg.base_url.rstrip("/") + "/chat/completions"
        self.headers = _headers(api_key)
        self.pool = ThreadPoolExecutor(max_workers=cfg.max_concurrency, thread_name_prefix="synth-http")
        self.limiter = _RateLimiter(cfg.requests_per_second)
        self.counts: Counter = Counter()
        self.lock = threading.Lock()

    def chat(self, conversations: Sequence[list[dict]], sampling: SamplingSettings) -> list[ChatResult]:
        futures = [self.pool.submit(self._complete, messages, sampling, request_seed(sampling.seed, index))
                   for index, messages in enumerate(conversations)]
        return [future.result() for future in futures]

    def stats(self) -> dict[str, int]:
        with self.lock:
            return dict(self.counts)

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)

    def _count(self, key: str) -> None:
        with self.lock:
            self.counts[key] += 1

    def _payload(self, messages: list[dict], sampling: SamplingSettings, seed: int) -> bytes:
        body = {"model": self.model, "messages": messages, "max_tokens": sampling.max_new_tokens,
                "temperature": sampling.temperature, "seed": seed}
        if not sampling.greedy:
            body["top_p"] = sampling.top_p
            if sampling.top_k > 0:  # not in OpenAI's own API: set top_k 0 for endpoints that refuse it
                body["top_k"] = sampling.top_k
        body.update(self.cfg.extra_body)
        return json.dumps(body).encode("utf-8")

    def _complete(self, messages: list[dict], sampling: SamplingSettings, seed: int) -> ChatResult:
        payload = self._payload(messages, sampling, seed)
        last = "no attempt"
        for attempt in range(self.cfg.max_retries + 1):
            self.limiter.wait()
            self._count("requests")
            try:
                return self._post(payload)
            except _Retry as retry:
                self._count(f"retries/{retry.cause}")
                last = retry.detail
                if attempt == self.cfg.max_retries:
                    break
                delay = min(self.cfg.backoff_max_s, self.cfg.backoff_initial_s * 2 ** attempt)
                delay *= random.uniform(0.5, 1.5)
                if retry.retry_after is not None:
                    delay = min(self.cfg.backoff_max_s, retry.retry_after)
                time.sleep(delay)
        self._count("failed")
        return ChatResult(text="", finish_reason="failed", error=f"{self.cfg.max_retries + 1} attempts; last: {last}")

    def _post(self, payload: bytes) -> ChatResult:
        request = urllib.request.Request(self.url, data=payload, headers=self.headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.cfg.timeout_s) as reply:
                raw = reply.read()
        except urllib.error.HTTPError as e:
            body = _body_text(e)
            if e.code == 429 or e.code >= 500:
                retry_after = e.headers.get("Retry-After") if e.headers else None
                try:
                    retry_after = float(retry_after) if retry_after is not None else None
                except ValueError:
                    retry_after = None  # an HTTP date: use our own backoff
                raise _Retry("429" if e.code == 429 else "5xx", f"HTTP {e.code} {body}", retry_after) from None
            if e.code == 400 and any(marker in body.lower() for marker in _CONTEXT_ERRORS):
                return ChatResult(text="", finish_reason="prompt_too_long", error=body)
            raise EndpointError(f"generator.openai: {self.url} refused the request: HTTP {e.code} {body}") from None
        except TimeoutError as e:
            raise _Retry("timeout", f"timed out after {self.cfg.timeout_s:g}s ({e})") from None
        except urllib.error.URLError as e:
            if isinstance(e.reason, (TimeoutError, socket.timeout)):
                raise _Retry("timeout", f"timed out after {self.cfg.timeout_s:g}s") from None
            raise _Retry("connection", f"connection failed: {e.reason}") from None
        except (http.client.HTTPException, ConnectionError, OSError) as e:
            raise _Retry("connection", f"connection broke: {type(e).__name__}: {e}") from None
        try:
            data = json.loads(raw.decode("utf-8"))
            choice = data["choices"][0]
            text = choice["message"].get("content") or ""
            finish = choice.get("finish_reason") or "stop"
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, IndexError, TypeError, AttributeError):
            raise _Retry("bad_reply", f"a reply that is not a chat completion: {raw[:120]!r}") from None
        usage = data.get("usage") or {}
        return ChatResult(text=text, finish_reason="length" if finish == "length" else "stop",
                          prompt_tokens=int(usage.get("prompt_tokens") or 0),
                          completion_tokens=int(usage.get("completion_tokens") or 0))
