"""`Client` and `AsyncClient`: twins over one request builder (`_Calls`), like httpx's.

Each API call is described once, as a `_Call` (method, path, body, whether it is safe to
retry, how to parse the answer); the two clients differ only in how they send it and sleep.
Connections are reused (one ``httpx.Client`` per instance); use the clients as context
managers, or call ``close()``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from urllib.parse import quote

import httpx
from pydantic import BaseModel

from sessionrec_client import errors
from sessionrec_client.models import (
    DeleteUserResponse,
    LabeledItem,
    ReadyResponse,
    RecommendRequest,
    RecommendResponse,
    ReloadResponse,
    RequestContext,
    SessionRequest,
    SessionResponse,
)
from sessionrec_client.retry import Retry

DEFAULT_URL = "http://127.0.0.1:8000"
DEFAULT_TIMEOUT = httpx.Timeout(2.0, connect=1.0)

Items = Iterable[LabeledItem | tuple[str, int] | str]


@dataclass(frozen=True)
class _Call:
    method: str
    path: str
    body: dict | None = None
    idempotent: bool = True  # safe to retry
    parse: type[BaseModel] | None = None  # None: raw text (metrics) or a dict (model)
    headers: dict[str, str] = field(default_factory=dict)


class _Calls:
    """Builds every call of the API; no I/O."""

    def __init__(self, admin_token: str | None) -> None:
        self._admin_token = admin_token

    def recommend(
        self,
        user_id: str,
        k: int = 50,
        *,
        timestamp: datetime | float | None = None,
        context_items: Items = (),
        exclude: Iterable[str] = (),
        exclude_seen: bool = True,
    ) -> _Call:
        ctx_items = _items(context_items)
        context = (
            RequestContext(timestamp=timestamp, items=ctx_items)
            if timestamp is not None or ctx_items
            else None
        )
        req = RecommendRequest(
            user_id=user_id, k=k, context=context, exclude=list(exclude), exclude_seen=exclude_seen
        )
        return _Call("POST", "/recommend/session", _dump(req), parse=RecommendResponse)

    def close_session(
        self,
        user_id: str,
        session_id: str,
        items: Items,
        *,
        ended_at: datetime | float,
        started_at: datetime | float | None = None,
    ) -> _Call:
        req = SessionRequest(
            user_id=user_id,
            session_id=session_id,
            ended_at=ended_at,
            started_at=started_at,
            items=_items(items),
        )
        # Idempotent on session_id: a retried close is a no-op on the server.
        return _Call("POST", "/sessions", _dump(req), parse=SessionResponse)

    def delete_user(self, user_id: str) -> _Call:
        return _Call("DELETE", f"/users/{quote(user_id, safe='')}", parse=DeleteUserResponse)

    def health(self) -> _Call:
        return _Call("GET", "/healthz")

    def ready(self) -> _Call:
        return _Call("GET", "/readyz", parse=ReadyResponse)

    def model(self) -> _Call:
        return _Call("GET", "/model")

    def metrics(self) -> _Call:
        return _Call("GET", "/metrics")

    def reload(self, model_ref: str = "current") -> _Call:
        headers = {"Authorization": f"Bearer {self._admin_token}"} if self._admin_token else {}
        return _Call(
            "POST",
            "/admin/reload",
            {"model_ref": model_ref},
            idempotent=False,
            parse=ReloadResponse,
            headers=headers,
        )


def _items(items: Items) -> list[LabeledItem]:
    out = []
    for it in items:
        if isinstance(it, LabeledItem):
            out.append(it)
        elif isinstance(it, str):
            out.append(LabeledItem(item_id=it))
        else:
            item_id, label = it
            out.append(LabeledItem(item_id=item_id, label=label))
    return out


def _dump(model: BaseModel) -> dict:
    return model.model_dump(mode="json", exclude_none=True)


def _result(call: _Call, response: httpx.Response) -> Any:
    if call.parse is ReadyResponse and response.status_code == 503:
        return ReadyResponse.model_validate_json(response.content)  # not ready is an answer
    if response.status_code >= 400:
        try:
            detail = response.json().get("detail", response.text)
        except ValueError:
            detail = response.text
        raise errors.error_for(response.status_code, detail, response.headers.get("x-request-id"))
    if call.parse is not None:
        return call.parse.model_validate_json(response.content)
    if response.headers.get("content-type", "").startswith("application/json"):
        return response.json()
    return response.text


def _retry_after(response: httpx.Response | None, retry: Retry, attempt: int) -> float:
    header = response.headers.get("retry-after") if response is not None else None
    if header and header.isdigit():
        return min(float(header), retry.backoff_max)
    return retry.delay(attempt)


class _Base:
    def __init__(self, admin_token: str | None, retry: Retry) -> None:
        self.calls = _Calls(admin_token)
        self.retry = retry

    def _attempts(self, call: _Call) -> int:
        return self.retry.attempts if call.idempotent else 1

    def _retryable(self, response: httpx.Response) -> bool:
        return response.status_code in self.retry.statuses


class Client(_Base):
    """Blocking client. ``transport`` may be any httpx transport (e.g. ``httpx.MockTransport``
    or ``httpx.WSGITransport`` in tests)."""

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        *,
        timeout: httpx.Timeout | float = DEFAULT_TIMEOUT,
        retry: Retry | None = None,
        admin_token: str | None = None,
        transport: httpx.BaseTransport | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(admin_token, retry or Retry())
        self._http = httpx.Client(
            base_url=base_url, timeout=timeout, transport=transport, headers=headers
        )

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def recommend(self, user_id: str, k: int = 50, **kw) -> RecommendResponse:
        """Top-``k`` items for the session ``user_id`` is opening; see `_Calls.recommend`."""
        return self._send(self.calls.recommend(user_id, k, **kw))

    def close_session(self, user_id: str, session_id: str, items: Items, **kw) -> SessionResponse:
        return self._send(self.calls.close_session(user_id, session_id, items, **kw))

    def delete_user(self, user_id: str) -> DeleteUserResponse:
        return self._send(self.calls.delete_user(user_id))

    def health(self) -> dict:
        return self._send(self.calls.health())

    def ready(self) -> ReadyResponse:
        return self._send(self.calls.ready())

    def model(self) -> dict:
        return self._send(self.calls.model())

    def metrics(self) -> str:
        return self._send(self.calls.metrics())

    def reload(self, model_ref: str = "current") -> ReloadResponse:
        return self._send(self.calls.reload(model_ref))

    def _send(self, call: _Call) -> Any:
        attempts = self._attempts(call)
        for attempt in range(1, attempts + 1):
            response = None
            try:
                response = self._http.request(
                    call.method, call.path, json=call.body, headers=call.headers
                )
            except httpx.TimeoutException as exc:
                error: errors.SessionrecError = errors.TimeoutError(str(exc) or "timed out")
            except httpx.TransportError as exc:
                error = errors.TransportError(str(exc) or exc.__class__.__name__)
            else:
                if attempt == attempts or not self._retryable(response):
                    return _result(call, response)
            if attempt == attempts:
                raise error
            time.sleep(_retry_after(response, self.retry, attempt))
        raise AssertionError("unreachable")


class AsyncClient(_Base):
    """The asyncio twin of `Client`: same methods, awaited."""

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        *,
        timeout: httpx.Timeout | float = DEFAULT_TIMEOUT,
        retry: Retry | None = None,
        admin_token: str | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        headers: dict[str, str] | None = None,
        limits: httpx.Limits | None = None,
    ) -> None:
        super().__init__(admin_token, retry or Retry())
        self._http = httpx.AsyncClient(
            base_url=base_url,
            timeout=timeout,
            transport=transport,
            headers=headers,
            limits=limits or httpx.Limits(max_connections=100, max_keepalive_connections=20),
        )

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def recommend(self, user_id: str, k: int = 50, **kw) -> RecommendResponse:
        return await self._send(self.calls.recommend(user_id, k, **kw))

    async def close_session(
        self, user_id: str, session_id: str, items: Items, **kw
    ) -> SessionResponse:
        return await self._send(self.calls.close_session(user_id, session_id, items, **kw))

    async def delete_user(self, user_id: str) -> DeleteUserResponse:
        return await self._send(self.calls.delete_user(user_id))

    async def health(self) -> dict:
        return await self._send(self.calls.health())

    async def ready(self) -> ReadyResponse:
        return await self._send(self.calls.ready())

    async def model(self) -> dict:
        return await self._send(self.calls.model())

    async def metrics(self) -> str:
        return await self._send(self.calls.metrics())

    async def reload(self, model_ref: str = "current") -> ReloadResponse:
        return await self._send(self.calls.reload(model_ref))

    async def _send(self, call: _Call) -> Any:
        attempts = self._attempts(call)
        for attempt in range(1, attempts + 1):
            response = None
            try:
                response = await self._http.request(
                    call.method, call.path, json=call.body, headers=call.headers
                )
            except httpx.TimeoutException as exc:
                error: errors.SessionrecError = errors.TimeoutError(str(exc) or "timed out")
            except httpx.TransportError as exc:
                error = errors.TransportError(str(exc) or exc.__class__.__name__)
            else:
                if attempt == attempts or not self._retryable(response):
                    return _result(call, response)
            if attempt == attempts:
                raise error
            await asyncio.sleep(_retry_after(response, self.retry, attempt))
        raise AssertionError("unreachable")
