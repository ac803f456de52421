from __future__ import annotations

import asyncio
import time

import orjson
from fastapi import APIRouter, HTTPException, Request, Response, status

from service.batcher import Overloaded
from service.schemas import BODY_ERRORS, ErrorResponse, RecommendRequest, RecommendResponse

router = APIRouter(tags=["recommend"])


@router.post(
    "/recommend/session",
    response_model=RecommendResponse,
    responses={**BODY_ERRORS, 503: {"model": ErrorResponse, "description": "overloaded; retry"}},
)
async def recommend_session(body: RecommendRequest, request: Request) -> Response:
    """Top-k items for the session a user is opening, from one incremental model step.

    `source` says which rung of the degradation ladder served it: `state` (cached K/V),
    `rebuilt` (cache rebuilt from the session log), `cold_start` (no history) or `degraded`
    (Redis unavailable: a cold-start answer).
    """
    # The hot path reads the app's objects off the request instead of through Depends: each
    # FastAPI dependency costs a query-string parse per request (measured, BENCHMARKS.md).
    recommender = request.app.state.recommender
    settings = request.app.state.settings
    rid = request.scope["state"]["request_id"]
    started = time.perf_counter()
    try:
        async with asyncio.timeout(settings.request_timeout_ms / 1000):
            out = await recommender.recommend(body)
    except Overloaded as exc:
        recommender.metrics.overloaded.inc()
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE, f"overloaded: {exc}", headers={"Retry-After": "1"}
        ) from None
    except TimeoutError:
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE,
            "overloaded: the request passed its deadline in the queue",
            headers={"Retry-After": "1"},
        ) from None
    res = out.result
    # The hot path's answer is serialised here, once, with orjson; `response_model` above still
    # documents it (OpenAPI) and `tests/test_client.py` checks the shape against it.
    payload = {
        "user_id": body.user_id,
        "model_version": out.model_version,
        "source": out.source.value,
        "items": [
            {"item_id": i, "score": s} for i, s in zip(res.item_ids, res.scores, strict=True)
        ],
        "exhausted": res.exhausted,
        "timing": {
            "total_ms": (time.perf_counter() - started) * 1000,
            "queue_ms": out.queue_s * 1000,
            "redis_ms": out.redis_s * 1000,
            "compute_ms": out.compute_s * 1000,
            "batch_size": out.batch_size,
        },
        "request_id": rid,
    }
    return Response(orjson.dumps(payload), media_type="application/json")
