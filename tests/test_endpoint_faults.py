"""Endpoint faults at the request level: each fault has a defined outcome, never an empty success."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402

from ood_core.config import EndpointConfig, MLLMSpec  # noqa: E402
from ood_core.models import RetryableError, load_mllm  # noqa: E402
from ood_core.models.endpoint import EndpointDown, EndpointRequestError, parse_retry_after  # noqa: E402
from tests.fault_server import FaultServer  # noqa: E402

# timeouts well above a busy machine's scheduling delays, "slow" answers well above the timeouts
FAST = EndpointConfig(timeout=1.0, connect_timeout=1.0, max_retries=3, backoff_initial=0.01, backoff_max=0.05,
                      breaker_failures=2, breaker_cooldown=0.0)
MSG = [{"role": "user", "content": "hi"}]


def client(url: str, cfg: EndpointConfig = FAST, key_env: str = "SYNTHOOD_FAULT_KEY"):
    spec = MLLMSpec(backend="openai", name="m", base_url=url, api_key_env=key_env)
    return load_mllm(spec, "cpu", "/nonexistent", endpoint=cfg)


@pytest.mark.parametrize(
    "script",
    [["429", "429", "ok"], ["500", "500", "ok"], ["reset", "ok"], ["slow", "ok"], ["429ra", "ok"]],
    ids=["429", "500", "reset", "slow", "429-retry-after"],
)
def test_transient_faults_are_retried_to_a_reply(script):
    with FaultServer(["ok", *script], slow_seconds=3.0) as srv:
        c = client(srv.url)
        assert c.chat(MSG).startswith("stone arch")  # a healthy first request
        assert c.chat(MSG).startswith("stone arch")
        assert srv.actions() == ["ok", *script]
    waits = c.transport.waits
    assert len(waits) == len(script) - 1
    if script[0] == "429ra":
        assert waits == [1.0]  # Retry-After honoured over the (shorter) backoff
    else:
        assert all(0 <= w <= FAST.backoff_max for w in waits)


@pytest.mark.parametrize(
    "action,reason",
    [("err200", "error_object"), ("nonjson", "bad_response"), ("empty", "empty_reply"), ("echo", "http_400")],
)
def test_unusable_answers_are_request_errors_not_retried(action, reason):
    with FaultServer(["ok", action, "ok"]) as srv:
        c = client(srv.url)
        c.chat(MSG)
        with pytest.raises(EndpointRequestError) as err:
            c.chat(MSG)
        assert err.value.reason == reason and "127.0.0.1" in str(err.value)
        assert not isinstance(err.value, RetryableError)  # a failed row, not a shard retry
        assert c.chat(MSG).startswith("stone arch")  # the endpoint is still usable
        assert srv.actions() == ["ok", action, "ok"]


def test_echoed_key_and_authorization_are_scrubbed(monkeypatch):
    key = "sk-planted-0123456789abcdef"
    monkeypatch.setenv("SYNTHOOD_FAULT_KEY", key)
    with FaultServer(["echo"]) as srv:
        c = client(srv.url)
        with pytest.raises(EndpointRequestError) as err:
            c.chat(MSG)
        assert srv.log[0]["auth"] == f"Bearer {key}"  # the key was sent...
    text = str(err.value)
    assert key not in text and "0123456789abcdef" not in text  # ...and is not in the error
    assert "Authorization" in text or "authorization" in text


def test_one_request_failing_every_retry_is_a_failed_row_after_a_success():
    # after a success, one request timing out on every attempt is that request's problem
    with FaultServer(["ok", "slow", "slow", "slow", "slow", "ok"], slow_seconds=3.0) as srv:
        c = client(srv.url)
        c.chat(MSG)
        with pytest.raises(EndpointRequestError) as err:
            c.chat(MSG)
        assert err.value.reason == "timeout" and "4 attempts" in str(err.value)
        assert c.chat(MSG).startswith("stone arch")


def test_endpoint_down_for_good_opens_the_breaker_and_fails_the_shard():
    with FaultServer(["ok"], default="500") as srv:
        c = client(srv.url)
        c.chat(MSG)
        with pytest.raises(EndpointRequestError, match="HTTP 500"):
            c.chat(MSG)  # one request failing every retry: still a row
        with pytest.raises(EndpointDown, match=r"127\.0\.0\.1.*counts as down") as err:
            c.chat(MSG)  # breaker_failures=2 in a row: the endpoint is down
        assert isinstance(err.value, RetryableError)
        assert srv.actions().count("500") == 2 * (FAST.max_retries + 1)


def test_unreachable_endpoint_before_any_success_fails_the_shard():
    with pytest.raises(EndpointDown, match=r"http://127\.0\.0\.1:9/v1/chat/completions.*ConnectError"):
        client("http://127.0.0.1:9/v1").chat(MSG)


def test_in_flight_requests_are_bounded():
    import contextlib
    import threading

    cfg = FAST.model_copy(update={"max_in_flight": 2, "timeout": 5.0})
    with FaultServer(default="slow", slow_seconds=1.0) as srv:
        c = client(srv.url, cfg)
        peak, live, lock = [0], [0], threading.Lock()
        real = c.transport._client.stream

        @contextlib.contextmanager
        def counting_stream(*a, **kw):
            with lock:
                live[0] += 1
                peak[0] = max(peak[0], live[0])
            try:
                with real(*a, **kw) as resp:
                    yield resp
            finally:
                with lock:
                    live[0] -= 1

        c.transport._client.stream = counting_stream
        threads = [threading.Thread(target=c.chat, args=(MSG,)) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert peak[0] == 2 and len(srv.log) == 6


def test_url_credentials_are_used_but_never_shown():
    with FaultServer(["echo"]) as srv:
        url = srv.url.replace("http://", "http://alice:pw-s3cr3t-xyz@")
        c = client(url, key_env="SYNTHOOD_UNSET_KEY")
        assert "pw-s3cr3t-xyz" not in c.url
        with pytest.raises(EndpointRequestError) as err:
            c.chat(MSG)
        assert srv.log[0]["auth"].startswith("Basic ")
    assert "pw-s3cr3t-xyz" not in str(err.value) and "YWxpY2U6" not in str(err.value)


def test_retry_after_forms():
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0
