"""A scripted OpenAI-compatible /v1/chat/completions server on 127.0.0.1 for endpoint fault tests.

Each request takes the next action of ``script`` (then ``default``): ``ok``, ``429``, ``429ra``
(with ``Retry-After: 1``), ``401`` (a rejected key), ``500``, ``reset`` (connection reset, no answer), ``slow`` (answers
after ``slow_seconds``), ``err200`` (a 200 with an error object), ``nonjson`` (a 200 HTML body),
``empty`` (a 200 with empty content), ``echo`` (a 400 echoing the request, headers included),
``huge`` (the reply padded to ``huge_bytes`` with one endless line), ``many`` (an answer listing
``many_labels`` labels, the reply's five over and over), ``trickle`` (a good answer sent one byte
every ``trickle_seconds``; ``trickled`` counts the bytes it got out), ``reply:<text>`` (answers
``<text>``).
``GET /v1/models`` answers ``models`` (not taken from the script): None (the default) the 501 of a
server without that route, ``ok`` the list ``served``, or a status code such as ``401``.
"""

from __future__ import annotations

import json
import socket
import struct
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

REPLY = "stone arch\nwooden fence\nfoggy harbour\nred kite\nglass jar"


def huge_reply(size: int) -> str:
    """REPLY, then one line of filler words up to ``size`` characters (too many words for a label)."""
    return (REPLY + "\n" + "filler " * (size // 7 + 1))[:size]


def many_reply(n: int) -> str:
    """An answer listing ``n`` labels: REPLY's five, over and over."""
    lines = REPLY.split("\n")
    return "\n".join(lines[i % len(lines)] for i in range(n))


class FaultServer:
    def __init__(self, script: list[str] | None = None, default: str = "ok", slow_seconds: float = 1.0,
                 models: str | None = None, served: tuple[str, ...] = ("m",), huge_bytes: int = 5 * 2**20,
                 many_labels: int = 20_000, trickle_seconds: float = 1.0):
        self.script = list(script or [])
        self.huge_bytes, self.many_labels, self.trickle_seconds = huge_bytes, many_labels, trickle_seconds
        self.trickled = 0
        self.requests: list[bytes] = []  # every POST body
        self.models, self.served = models, served
        self.get_log: list[dict] = []  # Authorization header of every GET
        self.default = default
        self.slow_seconds = slow_seconds
        self.log: list[dict] = []  # action, Authorization header, model of every request
        self.lock = threading.Lock()
        self.srv = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.srv.daemon_threads = True
        self.thread = threading.Thread(target=self.srv.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.srv.server_address[1]}/v1"

    def next_action(self) -> str:
        with self.lock:
            return self.script.pop(0) if self.script else self.default

    def actions(self) -> list[str]:
        return [e["action"] for e in self.log]

    def __enter__(self) -> FaultServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.srv.shutdown()
        self.srv.server_close()

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def _send(self, code: int, body: bytes, ctype: str = "application/json", headers: dict | None = None):
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):  # noqa: N802 - http.server's naming
                with server.lock:
                    server.get_log.append({"path": self.path, "auth": self.headers.get("Authorization")})
                if server.models is None or not self.path.rstrip("/").endswith("/models"):
                    self._send(501, b"Unsupported method ('GET')", ctype="text/plain")
                elif server.models == "ok":
                    body = {"object": "list", "data": [{"id": m, "object": "model"} for m in server.served]}
                    self._send(200, json.dumps(body).encode())
                else:
                    self._send(int(server.models), b'{"error": {"message": "invalid api key"}}')

            def do_POST(self):  # noqa: N802 - http.server's naming
                raw = self.rfile.read(int(self.headers["Content-Length"]))
                action = server.next_action()
                with server.lock:
                    server.log.append({"action": action, "auth": self.headers.get("Authorization")})
                    server.requests.append(raw)

                def answer(content: str) -> bytes:
                    return json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode()

                ok = answer(REPLY)
                try:
                    if action == "ok":
                        self._send(200, ok)
                    elif action == "huge":
                        self._send(200, answer(huge_reply(server.huge_bytes)))
                    elif action == "many":
                        self._send(200, answer(many_reply(server.many_labels)))
                    elif action.startswith("reply:"):
                        self._send(200, answer(action[len("reply:"):]))
                    elif action == "trickle":
                        self.send_response(200)
                        self.send_header("Content-Type", "application/json")
                        self.send_header("Content-Length", str(len(ok)))
                        self.end_headers()
                        self.wfile.flush()
                        for i in range(len(ok)):
                            self.wfile.write(ok[i : i + 1])
                            self.wfile.flush()
                            with server.lock:
                                server.trickled += 1
                            time.sleep(server.trickle_seconds)
                    elif action == "429":
                        self._send(429, b'{"error": {"message": "rate limited"}}')
                    elif action == "401":
                        self._send(401, b'{"error": {"message": "Incorrect API key provided", "code": "invalid_api_key"}}')
                    elif action == "429ra":
                        self._send(429, b'{"error": {"message": "rate limited"}}', headers={"Retry-After": "1"})
                    elif action == "500":
                        self._send(500, b"internal error")
                    elif action == "reset":
                        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                        self.connection.close()
                        self.close_connection = True
                    elif action == "slow":
                        time.sleep(server.slow_seconds)
                        self._send(200, ok)
                    elif action == "err200":
                        self._send(200, b'{"error": {"message": "model overloaded", "type": "server_error"}}')
                    elif action == "nonjson":
                        self._send(200, b"<html>502 Bad Gateway</html>", ctype="text/html")
                    elif action == "empty":
                        self._send(200, json.dumps({"choices": [{"message": {"content": ""}}]}).encode())
                    elif action == "echo":
                        echo = {"error": "bad request", "headers": dict(self.headers.items()), "body": raw.decode()[:300]}
                        self._send(400, json.dumps(echo).encode())
                    else:
                        raise ValueError(f"unknown action {action}")
                except OSError:
                    pass  # the client gave up (timeout) or the socket was reset on purpose

            def finish(self):
                try:
                    super().finish()
                except OSError:
                    pass

            def log_message(self, *args):
                pass

        return Handler
