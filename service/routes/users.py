from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, HTTPException, Path, status

from service.deps import RecommenderDep
from service.recommender import StoreUnavailable
from service.schemas import DeleteUserResponse, ErrorResponse

router = APIRouter(tags=["users"])


@router.delete(
    "/users/{user_id}",
    response_model=DeleteUserResponse,
    responses={503: {"model": ErrorResponse, "description": "state store unavailable; retry"}},
)
async def delete_user(
    user_id: Annotated[str, Path(pattern=r"^[A-Za-z0-9._:@-]{1,128}$")],
    recommender: RecommenderDep,
) -> DeleteUserResponse:
    """Forget a user: the session log, the K/V cache and the idempotency keys."""
    try:
        deleted = await recommender.forget(user_id)
    except StoreUnavailable as exc:
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE, str(exc), headers={"Retry-After": "1"}
        ) from None
    return DeleteUserResponse(user_id=user_id, deleted=deleted)
