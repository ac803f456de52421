"""ASGI middleware: request ids, per-route latency metrics, and the request body limit.

Pure ASGI (no ``BaseHTTPMiddleware``), so it adds no task or body copy per request.

* Request id: a valid incoming ``X-Request-ID`` (1-64 of ``A-Za-z0-9._-``) is kept, otherwise
  one is generated (128 random bits, hex); it is echoed on every response, stored in
  ``scope["state"]`` for handlers, and attached to every log record emitted while the request
  runs (`RequestIdFilter`).
* Latency: ``sessionrec_request_seconds{endpoint,method,status}``, where ``endpoint`` is the
  route *template* (``/users/{user_id}``) — never the raw path, so label cardinality is fixed.
* Body limit: a request whose ``Content-Length`` exceeds the limit, or whose streamed body
  grows past it, is answered 413 before the handler parses anything.
"""

from __future__ import annotations

import contextvars
import logging
import os
import re
import time

from starlette.exceptions import HTTPException

from service.metrics import Metrics

REQUEST_ID_HEADER = b"x-request-id"
_VALID_ID = re.compile(rb"^[A-Za-z0-9._-]{1,64}$")
request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")


class RequestIdFilter(logging.Filter):
    """Adds ``record.request_id`` (``-`` outside a request) to every log record."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id_var.get()
        return True


class ServiceMiddleware:
    def __init__(self, app, *, metrics: Metrics, max_body_bytes: int) -> None:
        self.app = app
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes
        self._children: dict[tuple[str, str, int], object] = {}

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        incoming = headers.get(REQUEST_ID_HEADER, b"")
        rid = incoming.decode() if _VALID_ID.match(incoming) else os.urandom(16).hex()
        scope.setdefault("state", {})["request_id"] = rid
        token = request_id_var.set(rid)
        started = time.perf_counter()
        status = [500]

        async def send_with_id(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                message["headers"] = [
                    *message.get("headers", []),
                    (REQUEST_ID_HEADER, rid.encode()),
                ]
            await send(message)

        try:
            declared = headers.get(b"content-length")
            if declared is None:  # streamed (chunked) or empty: count as it arrives
                await self.app(scope, self._limited(receive), send_with_id)
            elif not declared.isdigit() or int(declared) > self.max_body_bytes:
                await _too_large(send_with_id, self.max_body_bytes)
            else:  # the server delivers no more than Content-Length: nothing to count
                await self.app(scope, receive, send_with_id)
        finally:
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or "unmatched"
            self._latency(endpoint, scope["method"], status[0]).observe(
                time.perf_counter() - started
            )
            request_id_var.reset(token)

    def _latency(self, endpoint: str, method: str, status: int):
        key = (endpoint, method, status)
        child = self._children.get(key)
        if child is None:  # bounded: route templates × methods × status codes
            child = self._children[key] = self.metrics.request_seconds.labels(
                endpoint, method, str(status)
            )
        return child

    def _limited(self, receive):
        seen = 0
        limit = self.max_body_bytes

        async def receive_limited():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise BodyTooLarge(limit)
            return message

        return receive_limited


class BodyTooLarge(HTTPException):
    """Raised from ``receive`` while the body streams in; an HTTPException, so FastAPI's body
    reader passes it through as the 413 it is (any other error would become a 400)."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body larger than {limit} bytes")
        self.limit = limit


async def _too_large(send, limit: int) -> None:
    body = b'{"detail":"request body larger than %d bytes"}' % limit
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
