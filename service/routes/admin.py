from __future__ import annotations

from fastapi import APIRouter, Depends, HTTPException, status

from service.deps import RecommenderDep, require_admin
from service.runner import GenerationError
from service.schemas import (
    BODY_ERRORS,
    ErrorResponse,
    ReloadRequest,
    ReloadResponse,
    ValidationErrorResponse,
)

router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[Depends(require_admin)])


@router.post(
    "/reload",
    response_model=ReloadResponse,
    responses={
        **BODY_ERRORS,
        401: {"model": ErrorResponse},
        403: {"model": ErrorResponse},
        422: {
            "model": ErrorResponse | ValidationErrorResponse,
            "description": "reload refused (old generation serves), or an invalid body",
        },
    },
)
async def reload(recommender: RecommenderDep, body: ReloadRequest | None = None) -> ReloadResponse:
    """Load, verify (checksums) and warm a model version, then swap model + index + id map
    as one generation. If anything fails the current generation keeps serving."""
    ref = (body or ReloadRequest()).model_ref
    try:
        previous, version = await recommender.reload(ref)
    except GenerationError as exc:
        current = recommender.generation.version if recommender.generation else None
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT,
            f"reload refused, still serving {current}: {exc}",
        ) from None
    return ReloadResponse(previous_version=previous, model_version=version)
