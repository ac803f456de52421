from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.deps import RecommenderDep
from service.schemas import HealthResponse, ReadyResponse

router = APIRouter(tags=["ops"])


@router.get("/healthz", response_model=HealthResponse)
async def healthz() -> HealthResponse:
    """Liveness: the process answers HTTP."""
    return HealthResponse()


@router.get(
    "/readyz",
    response_model=ReadyResponse,
    responses={503: {"model": ReadyResponse, "description": "not ready"}},
)
async def readyz(recommender: RecommenderDep):
    """Readiness: a generation is loaded and warmed up, and Redis answers a PING in time."""
    gen = recommender.generation
    redis_ok = await recommender.redis_ok()
    body = ReadyResponse(
        ready=gen is not None and recommender.warmed and redis_ok,
        model_loaded=gen is not None,
        warmed_up=recommender.warmed,
        redis=redis_ok,
        model_version=gen.version if gen else None,
    )
    return JSONResponse(body.model_dump(), status_code=200 if body.ready else 503)


@router.get("/metrics", response_class=Response)
async def metrics(recommender: RecommenderDep) -> Response:
    """Prometheus metrics of this instance."""
    return Response(generate_latest(recommender.metrics.registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/model")
async def model(recommender: RecommenderDep) -> dict:
    """The generation being served: version, architecture, index, device, offline metrics."""
    gen = recommender.generation
    return gen.info if gen else {}
