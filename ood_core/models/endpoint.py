"""Resilient JSON-over-HTTP transport for model endpoints (every OpenAI-compatible request goes here).

Retries come from ``tenacity`` around ``httpx``: exponential backoff with jitter on 429, 5xx,
timeouts and connection errors, honouring ``Retry-After``. A bounded number of requests is in
flight per endpoint and process; each request has one deadline (``timeout``, from sending to the
last byte) and a body-size cap. A circuit breaker turns an
endpoint that stays unhealthy (``breaker_failures`` consecutive requests failing every retry, or
failing before any request succeeded) into :class:`EndpointDown`, a ``RetryableError`` that fails
the shard for the orchestrator's retry; a single request that fails for good, a 4xx, or a 200 whose
body is unusable is an :class:`EndpointRequestError`: a ``failed`` row for that candidate.
Every error text is scrubbed of the API key, credential headers and URL credentials.
"""

from __future__ import annotations

import email.utils
import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import tenacity

from ood_core.config import EndpointConfig
from ood_core.models import RetryableError
from ood_core.secrets import scrub, split_url_credentials


class EndpointDown(RetryableError):
    """The endpoint stays unhealthy: fail the shard (retried later), record no row."""


class EndpointRequestError(RuntimeError):
    """One request failed for good (4xx, unusable 200 body, retries used up): the candidate's failed row."""

    def __init__(self, reason: str, message: str):
        self.reason = reason
        super().__init__(scrub(message))


class _Transient(Exception):
    """A failure worth retrying; ``retry_after`` is the server's wish in seconds, if it said one."""

    def __init__(self, reason: str, message: str, retry_after: float | None = None):
        self.reason, self.retry_after = reason, retry_after
        super().__init__(scrub(message))


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or HTTP date); None if absent or invalid."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class _RetryAfterWait(tenacity.wait.wait_base):
    """The server's ``Retry-After`` when given (capped), else exponential backoff with jitter."""

    def __init__(self, cfg: EndpointConfig):
        self.cfg = cfg
        self.backoff = tenacity.wait_exponential_jitter(
            initial=cfg.backoff_initial, max=cfg.backoff_max, jitter=cfg.backoff_initial
        )

    def __call__(self, retry_state: tenacity.RetryCallState) -> float:
        err = retry_state.outcome.exception() if retry_state.outcome else None
        if isinstance(err, _Transient) and err.retry_after is not None:
            return min(err.retry_after, self.cfg.retry_after_max)
        return min(self.backoff(retry_state), self.cfg.backoff_max)


@dataclass
class CircuitBreaker:
    """Counts requests that failed every retry; opens after ``failures`` in a row (or before any success)."""

    failures: int
    cooldown: float
    consecutive: int = 0
    successes: int = 0
    opened_at: float | None = None
    last_error: str = ""
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def check(self, url: str) -> None:
        with self.lock:
            if self.opened_at is not None and time.monotonic() - self.opened_at < self.cooldown:
                raise EndpointDown(
                    f"MLLM endpoint {url} is unhealthy (circuit open after {self.consecutive} failed requests); "
                    f"last error: {self.last_error}"
                )

    def success(self) -> None:
        with self.lock:
            self.consecutive, self.opened_at = 0, None
            self.successes += 1

    def failure(self, error: str) -> bool:
        """Record a request that used up its retries; True when the endpoint now counts as down."""
        with self.lock:
            self.consecutive += 1
            self.last_error = error
            if self.consecutive >= self.failures or self.successes == 0:
                self.opened_at = time.monotonic()
                return True
            return False


_SLOTS: dict[str, threading.BoundedSemaphore] = {}
_SLOTS_LOCK = threading.Lock()


def _slots(url: str, n: int) -> threading.BoundedSemaphore:
    # per endpoint and process: parallel shard tasks in one worker share the bound
    with _SLOTS_LOCK:
        return _SLOTS.setdefault(f"{url}#{n}", threading.BoundedSemaphore(n))


class EndpointTransport:
    """POST JSON to one URL with retries, a bounded number in flight, a timeout and a circuit breaker."""

    def __init__(self, url: str, api_key: str | None, cfg: EndpointConfig | None = None):
        cfg = cfg or EndpointConfig()
        self.cfg = cfg
        self.url, creds = split_url_credentials(url)  # self.url is safe to show and store
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.Client(
            headers=headers,
            auth=httpx.BasicAuth(*creds) if creds and not api_key else None,
            timeout=httpx.Timeout(cfg.timeout, connect=cfg.connect_timeout),
        )
        self._slots = _slots(self.url, cfg.max_in_flight)
        self.breaker = CircuitBreaker(cfg.breaker_failures, cfg.breaker_cooldown)
        self.waits: list[float] = []  # every backoff wait, for logs and tests

    def _sleep(self, seconds: float) -> None:
        self.waits.append(seconds)
        time.sleep(seconds)

    def _exchange(self, body: dict) -> tuple[int, httpx.Headers, bytes]:
        """POST ``body``; (status, headers, body) read in full within ``timeout`` seconds in total.

        httpx's timeouts bound each read, so a server trickling its answer a byte at a time would
        hold a request indefinitely: the exchange runs in a thread that the caller waits on until
        the deadline. A thread left behind stops at its next chunk or at httpx's read timeout.
        """
        cfg, done, stop, box = self.cfg, threading.Event(), threading.Event(), {}

        def work() -> None:
            try:
                with self._client.stream("POST", self.url, json=body) as resp:
                    data = bytearray()
                    for part in resp.iter_bytes():
                        if stop.is_set():
                            return
                        data += part
                        if len(data) > cfg.max_response_bytes:
                            raise EndpointRequestError(
                                "response_too_large", f"MLLM endpoint {self.url} sent more than "
                                f"{cfg.max_response_bytes} bytes (models.endpoint.max_response_bytes): not read further")
                    box["answer"] = (resp.status_code, resp.headers, bytes(data))
            except BaseException as err:  # noqa: BLE001 - handed to the waiting caller
                box["error"] = err
            finally:
                done.set()

        threading.Thread(target=work, name="endpoint-request", daemon=True).start()
        if not done.wait(cfg.timeout):
            stop.set()
            raise _Transient("timeout", f"no complete answer within {cfg.timeout:g}s (models.endpoint.timeout)")
        if "error" in box:
            raise box["error"]
        return box["answer"]

    def _attempt(self, body: dict) -> Any:
        with self._slots:
            try:
                code, headers, raw = self._exchange(body)
            except httpx.TimeoutException as err:
                raise _Transient("timeout", f"no answer within {self.cfg.timeout:g}s ({type(err).__name__})") from None
            except httpx.TransportError as err:
                raise _Transient("connection_error", f"{type(err).__name__}: {err}") from None
        text = raw.decode("utf-8", errors="replace")
        if code in (408, 429) or code >= 500:
            raise _Transient(f"http_{code}", f"HTTP {code}: {text[:300]}", parse_retry_after(headers.get("retry-after")))
        if code >= 400:
            raise EndpointRequestError(f"http_{code}", f"MLLM endpoint {self.url} returned HTTP {code}: {text[:500]}")
        try:
            return json.loads(raw)
        except ValueError:
            raise EndpointRequestError(
                "bad_response", f"MLLM endpoint {self.url} returned HTTP {code} with a body that is not JSON: {text[:200]!r}"
            ) from None

    def post_json(self, body: dict) -> Any:
        """The decoded JSON answer; raises EndpointRequestError (this request) or EndpointDown (the endpoint)."""
        self.breaker.check(self.url)
        retrying = tenacity.Retrying(
            stop=tenacity.stop_after_attempt(self.cfg.max_retries + 1),
            wait=_RetryAfterWait(self.cfg),
            retry=tenacity.retry_if_exception_type(_Transient),
            sleep=self._sleep,
            reraise=True,
        )
        try:
            data = retrying(self._attempt, body)
        except _Transient as err:
            msg = f"MLLM endpoint {self.url} failed after {self.cfg.max_retries + 1} attempts: {err}"
            if self.breaker.failure(str(err)):
                raise EndpointDown(
                    scrub(f"{msg}; the endpoint counts as down ({self.breaker.consecutive} request(s) in a row "
                          f"failed every retry), failing the shard so it is retried later")
                ) from None
            raise EndpointRequestError(err.reason, msg) from None
        except EndpointRequestError:
            self.breaker.success()  # it answered: a problem of this request, not of the endpoint
            raise
        self.breaker.success()
        return data

    def close(self) -> None:
        self._client.close()
