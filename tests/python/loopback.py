"""An HTTP server on 127.0.0.1, in a thread of the test process, standing in for the hosts that
dino_rs downloads from (no test touches the internet). Each path is given a behaviour: serve bytes,
answer an error status, announce more bytes than it sends, or reset the connection midway; every
request is counted."""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Dict, List, Tuple


class Loopback:
    """The running server: ``url(path)`` to reach it, ``serve``/``error``/``truncate``/``reset`` to
    set what a path answers, ``requests`` (paths in order) and ``count(path)`` to see what came."""

    def __init__(self) -> None:
        self.routes: Dict[str, Tuple] = {}
        self.requests: List[str] = []
        self.user_agents: List[str] = []
        self.delay = 0.0  # seconds to wait before answering, so that concurrent requests overlap
        self._lock = threading.Lock()
        handler = type("Handler", (_Handler,), {"loopback": self})
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.server.daemon_threads = True
        # A short poll interval: shutdown() waits for the loop's next poll (0.5 s by default).
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.02,), daemon=True)
        self.thread.start()

    def url(self, path: str = "/") -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}/{path.lstrip('/')}"

    def serve(self, path: str, body: bytes) -> str:
        self.routes["/" + path.lstrip("/")] = ("body", body)
        return self.url(path)

    def error(self, path: str, status: int) -> str:
        self.routes["/" + path.lstrip("/")] = ("status", status)
        return self.url(path)

    def truncate(self, path: str, body: bytes, announced: int) -> str:
        """Announces ``announced`` bytes, sends ``body`` and closes the connection cleanly."""
        self.routes["/" + path.lstrip("/")] = ("truncate", body, announced)
        return self.url(path)

    def reset(self, path: str, body: bytes, sent: int) -> str:
        """Announces ``len(body)`` bytes, sends the first ``sent`` and resets the connection."""
        self.routes["/" + path.lstrip("/")] = ("reset", body, sent)
        return self.url(path)

    def count(self, path: str) -> int:
        with self._lock:
            return Counter(self.requests)["/" + path.lstrip("/")]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


class _Handler(BaseHTTPRequestHandler):
    loopback: Loopback

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - keep pytest's output clean
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        lb = self.loopback
        with lb._lock:
            lb.requests.append(self.path)
            lb.user_agents.append(self.headers.get("User-Agent", ""))
        if lb.delay:
            time.sleep(lb.delay)
        route = lb.routes.get(self.path)
        if route is None:
            self.send_error(404, "Not Found")
            return
        kind = route[0]
        if kind == "status":
            self.send_error(route[1])
            return
        body = route[1]
        announced = route[2] if kind == "truncate" else len(body)
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(announced))
        self.end_headers()
        if kind == "reset":
            self.wfile.write(body[: route[2]])
            self.wfile.flush()
            time.sleep(0.05)  # let the client read what came before the reset
            # SO_LINGER with a zero timeout: close() sends a TCP reset instead of a clean end.
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
            self.close_connection = True
            return
        self.wfile.write(body)
        self.close_connection = True
