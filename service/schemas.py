"""Request and response models of the HTTP API (pydantic v2), named ``<Thing>Request`` →
``<Thing>Response``. Every input is bounded — id formats, k, list lengths, timestamps — so a
bad request is a 422 that names the field and the rule, before any work is done.

Timestamps accept ISO 8601 (``2026-12-04T10:00:00Z``) or Unix seconds; a time without a zone
is read as UTC.
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    model_validator,
)

MAX_K = 1000
MAX_CONTEXT_ITEMS = 500
MAX_EXCLUDE = 1000
MAX_SESSION_ITEMS = 1000

UserId = Annotated[
    str,
    StringConstraints(pattern=r"^[A-Za-z0-9._:@-]{1,128}$"),
    Field(description="1-128 characters of A-Z a-z 0-9 . _ : @ -", examples=["u42"]),
]
ItemId = Annotated[
    str,
    StringConstraints(pattern=r"^[!-~]{1,128}$"),
    Field(description="1-128 printable ASCII characters, no spaces", examples=["i1234"]),
]
SessionId = Annotated[
    str,
    StringConstraints(pattern=r"^[!-~]{1,128}$"),
    Field(description="1-128 printable ASCII characters; the idempotency key of a close"),
]
Label = Annotated[Literal[0, 1], Field(description="1 = engaged (click/buy/cart), 0 = shown")]


def _utc(value: datetime) -> datetime:
    try:
        value = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    except OverflowError:  # 0001-01-01T00:00+01:00 is before year 1 in UTC (found by fuzzing)
        value = datetime.min.replace(tzinfo=UTC)
    if not 2000 <= value.year <= 2100:
        raise ValueError("timestamp must be between the years 2000 and 2100")
    return value


Timestamp = Annotated[datetime, AfterValidator(_utc)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LabeledItem(_Model):
    item_id: ItemId
    label: Label = 0


class RequestContext(_Model):
    timestamp: Timestamp | None = Field(None, description="request time; default: now")
    items: list[LabeledItem] = Field(
        default_factory=list,
        max_length=MAX_CONTEXT_ITEMS,
        description="items already shown (0) or clicked (1) in the session being opened",
    )


class RecommendRequest(_Model):
    user_id: UserId
    k: int = Field(50, ge=1, le=MAX_K, description="items to return")
    context: RequestContext | None = None
    exclude: list[ItemId] = Field(default_factory=list, max_length=MAX_EXCLUDE)
    exclude_seen: bool = Field(
        True, description="also exclude the items of `context.items` (already in this session)"
    )


class Source(enum.StrEnum):
    """Which rung of the degradation ladder served a recommendation."""

    STATE = "state"  # cached K/V of this model version: one incremental step
    REBUILT = "rebuilt"  # cache missing/stale: rebuilt from the raw session log, written back
    COLD_START = "cold_start"  # no history: the query token alone
    DEGRADED = "degraded"  # Redis unreachable or past its deadline: cold-start answer


class ScoredItem(_Model):
    item_id: str
    score: float


class Timing(_Model):
    total_ms: float
    queue_ms: float = Field(description="waiting for a batch")
    redis_ms: float = Field(description="state reads (and rebuild write-back) of the batch")
    compute_ms: float = Field(description="model step + index search of the batch")
    batch_size: int


class RecommendResponse(_Model):
    user_id: str
    model_version: str
    source: Source
    items: list[ScoredItem]
    exhausted: bool = Field(description="fewer than k items were left after exclusions")
    timing: Timing
    request_id: str


class SessionRequest(_Model):
    user_id: UserId
    session_id: SessionId
    started_at: Timestamp | None = Field(None, description="default: ended_at")
    ended_at: Timestamp
    items: list[LabeledItem] = Field(min_length=1, max_length=MAX_SESSION_ITEMS)

    @model_validator(mode="after")
    def _ordered(self) -> SessionRequest:
        if self.started_at is not None and self.started_at > self.ended_at:
            raise ValueError("started_at is after ended_at")
        return self


class CacheUpdate(enum.StrEnum):
    APPENDED = "appended"  # the session's K/V appended to the cache (one layer pass)
    REBUILT = "rebuilt"  # the cache rebuilt from the log (stale, missing or out-of-order)
    CURRENT = "current"  # a concurrent update already brought the cache up to date
    UNCHANGED = "unchanged"  # duplicate session id: nothing to do
    DEFERRED = "deferred"  # stored, but the cache was not updated now; the next read rebuilds


class SessionResponse(_Model):
    user_id: str
    session_id: str
    appended: bool = Field(description="false: this session id was already stored")
    seq: int = Field(
        description="the user's log sequence after this call: +1 per stored session; a new "
        "log (first session, or after expiry or delete) starts from the server clock"
    )
    cache: CacheUpdate
    unknown_items: list[str] = Field(
        description="items the serving model does not know; stored, ignored by the model"
    )
    model_version: str


class DeleteUserResponse(_Model):
    user_id: str
    deleted: bool = Field(description="false: nothing was stored for this user")


class HealthResponse(_Model):
    status: Literal["ok"] = "ok"


class ReadyResponse(_Model):
    ready: bool
    model_loaded: bool
    warmed_up: bool
    redis: bool
    model_version: str | None


class ReloadRequest(_Model):
    model_ref: str = Field(
        "current",
        pattern=r"^[A-Za-z0-9._-]{1,128}$",
        description="registry reference: current, latest, or a version (prefix)",
    )


class ReloadResponse(_Model):
    previous_version: str
    model_version: str


class ErrorResponse(_Model):
    detail: str


class ValidationErrorResponse(_Model):
    """FastAPI's own 422 body: one entry (``loc``, ``msg``, ``type`` …) per failed rule."""

    detail: list[dict[str, Any]]


# What any route with a JSON body can answer before its handler runs (OpenAPI `responses=`).
BODY_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "the body could not be read (not UTF-8)"},
    413: {"model": ErrorResponse, "description": "the body is larger than max_body_bytes"},
}
