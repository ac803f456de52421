"""The client's exceptions: one tree, each carrying what the server said.

SessionrecError
├── TransportError          no HTTP answer (connect refused, reset, timed out)
│   └── TimeoutError
└── APIError                an HTTP answer that is not 2xx: .status, .detail, .request_id
    ├── InvalidRequest      400, 413, 422 — the request is wrong; .detail says where
    ├── Unauthorized        401, 403
    ├── NotFound            404
    ├── Unavailable         503 — overloaded or the state store is down; retry later
    └── ServerError         other 5xx
"""

from __future__ import annotations

from typing import Any


class SessionrecError(Exception):
    """Base class of every error this client raises."""


class TransportError(SessionrecError):
    """The request got no HTTP answer."""


class TimeoutError(TransportError):  # noqa: A001 — deliberately the client's own
    """No answer within the client's timeout."""


class APIError(SessionrecError):
    """The server answered with an error status."""

    def __init__(self, status: int, detail: Any, request_id: str | None) -> None:
        self.status = status
        self.detail = detail
        self.request_id = request_id
        super().__init__(f"HTTP {status}: {_describe(detail)} (request id {request_id})")


class InvalidRequest(APIError):
    pass


class Unauthorized(APIError):
    pass


class NotFound(APIError):
    pass


class Unavailable(APIError):
    pass


class ServerError(APIError):
    pass


def error_for(status: int, detail: Any, request_id: str | None) -> APIError:
    cls = {
        400: InvalidRequest,
        413: InvalidRequest,
        422: InvalidRequest,
        401: Unauthorized,
        403: Unauthorized,
        404: NotFound,
        503: Unavailable,
    }.get(status)
    if cls is None:
        cls = ServerError if status >= 500 else APIError
    return cls(status, detail, request_id)


def _describe(detail: Any) -> str:
    """FastAPI's 422 detail is a list of {loc, msg}; make it one readable line."""
    if isinstance(detail, list):
        parts = []
        for err in detail:
            if isinstance(err, dict):
                loc = ".".join(str(p) for p in err.get("loc", []) if p != "body")
                parts.append(f"{loc}: {err.get('msg', '')}" if loc else str(err.get("msg", "")))
            else:
                parts.append(str(err))
        return "; ".join(parts)
    return str(detail)
