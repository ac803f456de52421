"""The Python client (clients/python) against a live service, plus its retry policy against
scripted transports, and its models against the service's OpenAPI schema."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from sessionrec_client import (
    NO_RETRY,
    AsyncClient,
    Client,
    InvalidRequest,
    Retry,
    TransportError,
    Unauthorized,
    Unavailable,
)
from sessionrec_client import models as client_models

from service.app import create_app
from service.settings import Settings
from tests.servers import LiveServer, build_registry

TOKEN = "client-test-token"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_registry(tmp_path_factory.mktemp("world"), versions=2)


@pytest.fixture
def server(world, redis_url):
    _, registry, _ = world
    settings = Settings(
        redis_url=redis_url, registry=registry.root, log_sessions=64, admin_token=TOKEN
    )
    with LiveServer(settings) as live:
        yield live


def test_the_blocking_client_covers_the_api(world, server):
    ds, _, versions = world
    items = [(ds.item_ids[0], 1), ds.item_ids[1], (ds.item_ids[2], 0)]
    with Client(server.url, admin_token=TOKEN) as client:
        assert client.health() == {"status": "ok"}
        assert client.ready().ready is True
        cold = client.recommend("cu1", k=7)
        assert cold.source == "cold_start" and len(cold.item_ids) == 7
        closed = client.close_session("cu1", "s1", items, ended_at=1_760_000_000)
        assert closed.appended is True and closed.seq > 0 and closed.unknown_items == []
        assert client.close_session("cu1", "s1", items, ended_at=1_760_000_000).appended is False
        rec = client.recommend(
            "cu1", k=5, timestamp=1_760_003_600, context_items=[ds.item_ids[3]], exclude=["x"]
        )
        assert rec.source == "state" and ds.item_ids[3] not in rec.item_ids
        assert rec.timing.batch_size >= 1 and rec.request_id
        assert client.model()["version"] == versions[0]
        assert "sessionrec_recommendations_total" in client.metrics()
        assert client.reload(versions[1]).model_version == versions[1]
        assert client.delete_user("cu1").deleted is True


def test_errors_carry_the_servers_message(server):
    with Client(server.url) as client:
        with pytest.raises(InvalidRequest) as bad:
            client.recommend("cu1", k=0)
        assert bad.value.status == 422
        assert "k: Input should be greater than or equal to 1" in str(bad.value)
        assert bad.value.request_id
        with pytest.raises(Unauthorized, match="missing or invalid admin token"):
            client.reload()
        with pytest.raises(InvalidRequest, match="started_at is after ended_at"):
            client.close_session(
                "cu1", "s", ["a"], ended_at=1_760_000_000, started_at=1_770_000_000
            )


def test_the_async_client_is_the_same_api(world, server):
    ds, _, _ = world

    async def main():
        async with AsyncClient(server.url) as client:
            await client.close_session("au1", "s1", [(ds.item_ids[5], 1)], ended_at=1_760_000_000)
            recs = await asyncio.gather(*(client.recommend("au1", k=10) for _ in range(32)))
            ready = await client.ready()
            deleted = await client.delete_user("au1")
        return recs, ready, deleted

    recs, ready, deleted = asyncio.run(main())
    assert all(r.source == "state" and len(r.items) == 10 for r in recs)
    assert len({tuple(r.item_ids) for r in recs}) == 1
    assert ready.ready and deleted.deleted


def test_an_unreachable_service_is_a_transport_error_after_bounded_retries():
    with Client("http://127.0.0.1:9", retry=Retry(attempts=2, backoff_base=0)) as client:
        with pytest.raises(TransportError):
            client.health()


def _scripted(statuses: list[int], seen: list[str]):
    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.path)
        status = statuses[min(len(seen) - 1, len(statuses) - 1)]
        if status == 200:
            return httpx.Response(200, json={"status": "ok"})
        return httpx.Response(status, json={"detail": "overloaded: queue is full"})

    return handler


def test_503_is_retried_for_idempotent_calls_only():
    seen: list[str] = []
    retry = Retry(attempts=3, backoff_base=0, backoff_max=0)
    transport = httpx.MockTransport(_scripted([503, 503, 200], seen))
    with Client("http://svc", retry=retry, transport=transport) as client:
        assert client.health() == {"status": "ok"}
    assert seen == ["/healthz"] * 3

    seen.clear()
    transport = httpx.MockTransport(_scripted([503], seen))
    with Client("http://svc", retry=retry, transport=transport, admin_token="t") as client:
        with pytest.raises(Unavailable, match="queue is full"):
            client.reload()
    assert seen == ["/admin/reload"]  # never retried: not idempotent

    seen.clear()
    transport = httpx.MockTransport(_scripted([503], seen))
    with Client("http://svc", retry=retry, transport=transport) as client:
        with pytest.raises(Unavailable):
            client.recommend("u1")
    assert len(seen) == 3  # bounded

    seen.clear()
    transport = httpx.MockTransport(_scripted([503, 200], seen))
    with Client("http://svc", retry=NO_RETRY, transport=transport) as client:
        with pytest.raises(Unavailable):
            client.health()
    assert len(seen) == 1


def test_422_and_other_errors_are_never_retried():
    seen: list[str] = []
    retry = Retry(attempts=5, backoff_base=0)
    transport = httpx.MockTransport(_scripted([422], seen))
    with Client("http://svc", retry=retry, transport=transport) as client:
        with pytest.raises(InvalidRequest):
            client.recommend("u1")
    assert len(seen) == 1


def test_the_client_models_match_the_service_schema():
    spec = create_app(Settings()).openapi()["components"]["schemas"]
    pairs = {
        "RecommendRequest": client_models.RecommendRequest,
        "RecommendResponse": client_models.RecommendResponse,
        "SessionRequest": client_models.SessionRequest,
        "SessionResponse": client_models.SessionResponse,
        "DeleteUserResponse": client_models.DeleteUserResponse,
        "ReadyResponse": client_models.ReadyResponse,
        "ReloadResponse": client_models.ReloadResponse,
        "Timing": client_models.Timing,
        "ScoredItem": client_models.ScoredItem,
        "RequestContext": client_models.RequestContext,
        "LabeledItem": client_models.LabeledItem,
    }
    for name, model in pairs.items():
        server_fields = set(spec[name]["properties"])
        assert set(model.model_fields) == server_fields, name
        server_required = set(spec[name].get("required", []))
        client_required = {n for n, f in model.model_fields.items() if f.is_required()}
        assert client_required == server_required, name
    assert {s.value for s in client_models.Source} == set(spec["Source"]["enum"])
