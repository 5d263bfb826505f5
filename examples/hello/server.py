"""A tiny dev server for trying ephemwork: it shows what reached the laptop.

Standard library only. It listens on 127.0.0.1 at $PORT (default 8000).

- ``GET /health`` returns 200 with the body ``ok``, for ``health_check_path``.
- Any other request returns 200 with JSON: the method, path, query, body length, the routing
  and forwarding headers (``X-Ephemwork``, ``X-Forwarded-For`` ...) and
  ``"served_by": "laptop"``.
"""

from __future__ import annotations

import json
import os
import sys
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

DEFAULT_PORT = 8000

# Headers worth seeing when checking that a request came through the bastion.
SHOWN_HEADERS = (
    "Host",
    "User-Agent",
    "X-Ephemwork",
    "X-Forwarded-For",
    "X-Forwarded-Proto",
    "X-Forwarded-Host",
)


class HelloHandler(BaseHTTPRequestHandler):
    """Request handler that returns a description of each request as JSON."""

    # HTTP/1.1 keeps connections open between requests, as a proxy's connection pool expects.
    protocol_version = "HTTP/1.1"
    server_version = "ephemwork-hello/1"

    def do_GET(self) -> None:
        if urlsplit(self.path).path == "/health":
            self._send(HTTPStatus.OK, b"ok", "text/plain; charset=utf-8")
            return
        self._describe_request()

    def do_POST(self) -> None:
        self._describe_request()

    def do_PUT(self) -> None:
        self._describe_request()

    def do_PATCH(self) -> None:
        self._describe_request()

    def do_DELETE(self) -> None:
        self._describe_request()

    def _describe_request(self) -> None:
        body = self._read_body()
        url = urlsplit(self.path)
        description = {
            "method": self.command,
            "path": url.path,
            "query": url.query,
            "body_length": len(body),
            "headers": {name: self.headers.get(name) for name in SHOWN_HEADERS},
            "served_by": "laptop",
            # Lets tests find the dev server's process group.
            "pid": os.getpid(),
        }
        payload = json.dumps(description, indent=2).encode() + b"\n"
        self._send(HTTPStatus.OK, payload, "application/json")

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            return self._read_chunked_body()

        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length)

    def _read_chunked_body(self) -> bytes:
        # http.server does not decode chunked request bodies; a proxy may send them.
        chunks = []
        while True:
            size_line = self.rfile.readline()
            size = int(size_line.split(b";")[0].strip(), 16)
            if size == 0:
                break
            chunks.append(self.rfile.read(size))
            self.rfile.readline()

        # Skip trailer fields up to the blank line that ends the body.
        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
            pass
        return b"".join(chunks)

    def _send(self, status: HTTPStatus, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def main() -> None:
    """Serve on 127.0.0.1:$PORT until interrupted."""
    port = int(os.environ.get("PORT", DEFAULT_PORT))
    server = ThreadingHTTPServer(("127.0.0.1", port), HelloHandler)
    print(f"hello: serving on http://127.0.0.1:{port}/", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
