"""FastAPI dependencies: what routes get from the app's lifespan, and the admin guard.

All ``async def``: FastAPI runs a plain ``def`` dependency in its threadpool, a thread hop per
request that measurably costs throughput (docs/BENCHMARKS.md).
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.recommender import Recommender
from service.settings import Settings

_bearer = HTTPBearer(auto_error=False, description="SESSIONREC_ADMIN_TOKEN")


async def get_recommender(request: Request) -> Recommender:
    return request.app.state.recommender


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


RecommenderDep = Annotated[Recommender, Depends(get_recommender)]
SettingsDep = Annotated[Settings, Depends(get_settings)]


async def require_admin(
    settings: SettingsDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    """Bearer-token guard; the token is compared in constant time and never logged."""
    if settings.admin_token is None:
        raise HTTPException(
            status.HTTP_403_FORBIDDEN,
            "admin endpoints are disabled: SESSIONREC_ADMIN_TOKEN is unset",
        )
    given = credentials.credentials.encode() if credentials else b""
    expected = settings.admin_token.get_secret_value().encode()
    if not credentials or not hmac.compare_digest(given, expected):
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "missing or invalid admin token",
            headers={"WWW-Authenticate": "Bearer"},
        )
