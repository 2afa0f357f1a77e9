"""A scripted OpenAI chat-completions server on 127.0.0.1 for testing ``llava/judge.py`` without the internet.

Each request is matched to its question by the ``[Question]`` block of the judge prompt. The server answers with
the next action queued for that question (or for ``"*"``, any question), and with a normal completion once the
queue is empty. Actions:

``ok``                 a chat completion whose content is ``replies[question]`` (default ``"8 7\\n..."``)
``reply:TEXT``         a chat completion whose content is TEXT
``nousage``            a normal completion without the ``usage`` field
``NNN`` / ``NNN:S``    that HTTP status (429, 500, 502, ...) with an error body, and ``Retry-After: S`` when S is
                       given (seconds or an HTTP-date): the openai client sleeps S before its retry
``hang``               say nothing until ``hang_seconds`` pass (or the server stops), then close
``garbage``            HTTP 200 whose body is not JSON
``badshape``           HTTP 200 with JSON that is not a chat completion
``drop``               close the connection without a response
``slow:S``             wait S seconds, then a normal completion

Run it alone with ``python tests/judge_server.py --port 8000`` to judge by hand against fixed "8 7" replies.
"""

from __future__ import annotations

import argparse
import json
import socket
import threading
import time
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

DEFAULT_REPLY = "8 7\nAssistant 1 is accurate and detailed; Assistant 2 is correct but brief."


def question_of(body: Mapping[str, Any]) -> str:
    """The question text inside the judge prompt of a chat-completions request body ('' when absent)."""
    try:
        content = body["messages"][-1]["content"]
        return content.split("[Question]\n", 1)[1].split("\n\n[Assistant 1]", 1)[0]
    except (KeyError, IndexError, TypeError, AttributeError):
        return ""


@dataclass
class SeenRequest:
    """One request as the server saw it, and what it did."""

    question: str
    body: dict[str, Any]
    authorization: str | None
    action: str
    time: float


@dataclass
class ServerState:
    """The script and the log shared by the handler threads."""

    script: dict[str, deque[str]]
    replies: dict[str, str]
    hang_seconds: float
    requests: list[SeenRequest] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    stopping: threading.Event = field(default_factory=threading.Event)

    def next_action(self, question: str) -> str:
        with self.lock:
            for key in ("*", question):
                queue = self.script.get(key)
                if queue:
                    return queue.popleft()
        return "ok"


def completion(content: str, *, with_usage: bool = True) -> dict[str, Any]:
    """A chat-completion response body."""
    body: dict[str, Any] = {
        "id": "chatcmpl-test",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": "gpt-4o-2024-08-06-test",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"},
        ],
    }
    if with_usage:
        body["usage"] = {"prompt_tokens": 100, "completion_tokens": 20, "total_tokens": 120}
    return body


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _send(self, status: int, payload: bytes, headers: Mapping[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(payload)

    def _send_json(self, status: int, body: Any, headers: Mapping[str, str] | None = None) -> None:
        self._send(status, json.dumps(body).encode("utf-8"), headers)

    def do_POST(self) -> None:
        state = self.server.state
        length = int(self.headers.get("Content-Length") or 0)
        try:
            body = json.loads(self.rfile.read(length) or b"{}")
        except json.JSONDecodeError:
            body = {}
        question = question_of(body)
        action = state.next_action(question)
        with state.lock:
            state.requests.append(
                SeenRequest(question, body, self.headers.get("Authorization"), action, time.monotonic())
            )
        self._act(action, question)

    def _act(self, action: str, question: str) -> None:
        state = self.server.state
        name, _, argument = action.partition(":")
        reply = state.replies.get(question, DEFAULT_REPLY)
        if name == "ok":
            self._send_json(200, completion(reply))
        elif name == "reply":
            self._send_json(200, completion(argument))
        elif name == "nousage":
            self._send_json(200, completion(reply, with_usage=False))
        elif name == "slow":
            state.stopping.wait(float(argument))
            self._send_json(200, completion(reply))
        elif name == "garbage":
            self._send(200, b"<html>upstream proxy error</html>{not json")
        elif name == "badshape":
            self._send_json(200, {"object": "list", "data": []})
        elif name == "hang":
            state.stopping.wait(state.hang_seconds)
            self.close_connection = True
        elif name == "drop":
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
        elif name.isdigit():
            headers = {"Retry-After": argument} if argument else None
            error = {"error": {"message": f"scripted {name}", "type": "server_error", "code": None}}
            self._send_json(int(name), error, headers)
        else:
            raise ValueError(f"unknown scripted action {action!r}")


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    state: ServerState


class JudgeServer:
    """Start with ``with JudgeServer(script=...) as server:``; ``server.base_url`` goes to ``--base-url``."""

    def __init__(
        self,
        script: Mapping[str, Iterable[str]] | None = None,
        replies: Mapping[str, str] | None = None,
        hang_seconds: float = 30.0,
        port: int = 0,
    ) -> None:
        state = ServerState(
            script={key: deque(actions) for key, actions in (script or {}).items()},
            replies=dict(replies or {}),
            hang_seconds=hang_seconds,
        )
        self._server = _Server(("127.0.0.1", port), _Handler)
        self._server.state = state
        self.state = state
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    @property
    def base_url(self) -> str:
        """The ``/v1`` base URL the openai client expects."""
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    @property
    def requests(self) -> list[SeenRequest]:
        """A copy of the requests seen so far."""
        with self.state.lock:
            return list(self.state.requests)

    def script(self, key: str, *actions: str) -> None:
        """Queue more actions for a question (or ``"*"``)."""
        with self.state.lock:
            self.state.script.setdefault(key, deque()).extend(actions)

    def start(self) -> JudgeServer:
        """Serve in a background thread."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Release hanging handlers and stop serving."""
        self.state.stopping.set()
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> JudgeServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main() -> None:
    """Serve "8 7" replies on a port until interrupted."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    with JudgeServer(port=args.port) as server:
        print(f"serving on {server.base_url}", flush=True)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
