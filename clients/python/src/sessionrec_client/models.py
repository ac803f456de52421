"""Typed requests and responses of the sessionrec HTTP API (mirrors the service's OpenAPI;
`tests/test_client.py` checks the two agree). Unknown response fields are ignored, so a newer
server does not break an older client."""

from __future__ import annotations

import enum
from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _Response(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class LabeledItem(_Request):
    item_id: str
    label: int = Field(0, ge=0, le=1, description="1 = engaged, 0 = shown")


class RequestContext(_Request):
    timestamp: datetime | int | float | None = None
    items: list[LabeledItem] = Field(default_factory=list)


class RecommendRequest(_Request):
    user_id: str
    k: int = 50
    context: RequestContext | None = None
    exclude: list[str] = Field(default_factory=list)
    exclude_seen: bool = True


class Source(enum.StrEnum):
    STATE = "state"
    REBUILT = "rebuilt"
    COLD_START = "cold_start"
    DEGRADED = "degraded"


class ScoredItem(_Response):
    item_id: str
    score: float


class Timing(_Response):
    total_ms: float
    queue_ms: float
    redis_ms: float
    compute_ms: float
    batch_size: int


class RecommendResponse(_Response):
    user_id: str
    model_version: str
    source: Source
    items: list[ScoredItem]
    exhausted: bool
    timing: Timing
    request_id: str

    @property
    def item_ids(self) -> list[str]:
        return [i.item_id for i in self.items]


class SessionRequest(_Request):
    user_id: str
    session_id: str
    ended_at: datetime | int | float
    started_at: datetime | int | float | None = None
    items: list[LabeledItem]


class SessionResponse(_Response):
    user_id: str
    session_id: str
    appended: bool
    seq: int
    cache: str
    unknown_items: list[str]
    model_version: str


class DeleteUserResponse(_Response):
    user_id: str
    deleted: bool


class ReadyResponse(_Response):
    ready: bool
    model_loaded: bool
    warmed_up: bool
    redis: bool
    model_version: str | None


class ReloadResponse(_Response):
    previous_version: str
    model_version: str
