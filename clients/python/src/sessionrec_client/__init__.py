"""Python client for the sessionrec service: `Client` (blocking) and `AsyncClient`.

from sessionrec_client import Client

with Client("http://127.0.0.1:8000") as client:
    rec = client.recommend("u00042", k=20)
    print(rec.source, rec.item_ids)
"""

from sessionrec_client._client import DEFAULT_TIMEOUT, DEFAULT_URL, AsyncClient, Client
from sessionrec_client.errors import (
    APIError,
    InvalidRequest,
    NotFound,
    ServerError,
    SessionrecError,
    TimeoutError,
    TransportError,
    Unauthorized,
    Unavailable,
)
from sessionrec_client.models import (
    LabeledItem,
    ReadyResponse,
    RecommendResponse,
    ReloadResponse,
    ScoredItem,
    SessionResponse,
    Source,
)
from sessionrec_client.retry import NO_RETRY, Retry

__all__ = [
    "DEFAULT_TIMEOUT",
    "DEFAULT_URL",
    "NO_RETRY",
    "APIError",
    "AsyncClient",
    "Client",
    "InvalidRequest",
    "LabeledItem",
    "NotFound",
    "ReadyResponse",
    "RecommendResponse",
    "ReloadResponse",
    "Retry",
    "ScoredItem",
    "ServerError",
    "SessionResponse",
    "SessionrecError",
    "Source",
    "TimeoutError",
    "TransportError",
    "Unauthorized",
    "Unavailable",
]
