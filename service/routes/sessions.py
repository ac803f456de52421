from __future__ import annotations

from fastapi import APIRouter, HTTPException, status

from service.deps import RecommenderDep
from service.recommender import StoreUnavailable
from service.schemas import BODY_ERRORS, ErrorResponse, SessionRequest, SessionResponse

router = APIRouter(tags=["sessions"])


@router.post(
    "/sessions",
    response_model=SessionResponse,
    responses={
        **BODY_ERRORS,
        503: {"model": ErrorResponse, "description": "state store unavailable; retry"},
    },
)
async def close_session(body: SessionRequest, recommender: RecommenderDep) -> SessionResponse:
    """Append a closed session to the user's state, atomically and idempotently on
    `session_id` (a retry or duplicate delivery is a no-op with `appended: false`).

    Items the serving model does not know are stored and listed in `unknown_items`. `cache`
    says how the K/V cache was brought up to date; `deferred` means the next recommendation
    rebuilds it from the log (nothing is lost).
    """
    try:
        out = await recommender.close_session(body)
    except StoreUnavailable as exc:
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE, str(exc), headers={"Retry-After": "1"}
        ) from None
    return SessionResponse(
        user_id=body.user_id,
        session_id=body.session_id,
        appended=out.appended.appended,
        seq=out.appended.seq,
        cache=out.cache,
        unknown_items=out.unknown_items,
        model_version=out.model_version,
    )
