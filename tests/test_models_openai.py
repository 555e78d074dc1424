"""The OpenAI-compatible MLLM backend against a fake local /v1/chat/completions server."""

from __future__ import annotations

import base64
import io
import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402
from PIL import Image  # noqa: E402

from ood_core.config import EndpointConfig, MLLMSpec  # noqa: E402
from ood_core.models import load_mllm  # noqa: E402


class _Handler(BaseHTTPRequestHandler):
    requests: list[dict] = []

    def do_POST(self):  # noqa: N802 - http.server's naming
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append(
            {"path": self.path, "auth": self.headers.get("Authorization"), "body": body}
        )
        if body["model"] == "broken":
            self.send_response(500)
            self.end_headers()
            self.wfile.write(b"boom")
            return
        payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": "a beach at dusk"}}]})
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(payload.encode())

    def log_message(self, *args):
        pass


@pytest.fixture()
def server():
    _Handler.requests = []
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/v1"
    srv.shutdown()
    srv.server_close()


def test_openai_backend_sends_image_and_model(server, monkeypatch):
    monkeypatch.setenv("SYNTHOOD_TEST_KEY", "sk-test")
    spec = MLLMSpec(
        backend="openai",
        name="llava-test",
        base_url=server,
        api_key_env="SYNTHOOD_TEST_KEY",
        temperature=0.2,
        max_new_tokens=7,
    )
    client = load_mllm(spec, "cpu", "/nonexistent")
    img = Image.new("RGB", (8, 6), (255, 0, 0))
    msgs = [{"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": "what?"}]}]
    assert client.chat(msgs, seed=3) == "a beach at dusk"

    (req,) = _Handler.requests
    assert req["path"] == "/v1/chat/completions"
    assert req["auth"] == "Bearer sk-test"
    body = req["body"]
    assert body["model"] == "llava-test"
    assert body["seed"] == 3 and body["temperature"] == 0.2 and body["max_tokens"] == 7
    parts = body["messages"][0]["content"]
    url = parts[0]["image_url"]["url"]
    assert parts[0]["type"] == "image_url" and url.startswith("data:image/png;base64,")
    decoded = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    assert decoded.size == (8, 6) and decoded.getpixel((0, 0)) == (255, 0, 0)
    assert parts[1] == {"type": "text", "text": "what?"}


# short retry waits keep the suite fast (the retries themselves are tested in test_endpoint_faults.py)
FAST = EndpointConfig(max_retries=2, backoff_initial=0.01, backoff_max=0.02)


def test_openai_backend_errors_name_the_url(server):
    spec = MLLMSpec(backend="openai", name="broken", base_url=server)
    client = load_mllm(spec, "cpu", "/nonexistent", endpoint=FAST)
    with pytest.raises(RuntimeError, match=r"127\.0\.0\.1.*HTTP 500"):
        client.chat([{"role": "user", "content": "hi"}])


def test_openai_backend_unreachable():
    spec = MLLMSpec(backend="openai", name="m", base_url="http://127.0.0.1:9/v1")
    with pytest.raises(RuntimeError, match=r"http://127\.0\.0\.1:9/v1/chat/completions"):
        load_mllm(spec, "cpu", "/nonexistent", endpoint=FAST).chat([{"role": "user", "content": "hi"}])


def test_openai_backend_requires_base_url():
    with pytest.raises(ValueError, match="base_url"):
        load_mllm(MLLMSpec(backend="openai", name="m"), "cpu", "/nonexistent")
