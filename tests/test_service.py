"""The service end to end: real redis-server, real uvicorn, real HTTP, a tiny trained model.

The reference for every recommendation is the offline model run directly — the evaluation
harness's full recompute (`SessionRecTask.score`) or `SessionRec.forward` over the whole
history — so these tests check the serving path (Redis state → incremental step → FAISS)
against the function that was trained and evaluated.
"""

from __future__ import annotations

import asyncio
import random
import shutil

import numpy as np
import pytest
import torch

from model_store.features import cap_events, session_gap
from model_store.model import Sessions, pad_tokens
from model_store.store import open_model
from service.app import redis_client, state_store
from service.backfill import Holdout, backfill, user_sessions
from service.runner import load_generation
from service.schemas import RecommendResponse
from service.settings import Settings
from service.state import SessionRecord
from tests.servers import LiveServer, RedisProcess, build_registry, run, wait_until
from training.config import TrainConfig
from training.dataset import Split
from training.pipeline import build_task

K = 20
TOKEN = "s3cret-admin-token"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    ds, registry, versions = build_registry(root)
    return ds, registry, versions


@pytest.fixture
def settings(world, redis_url):
    _, registry, _ = world
    return Settings(
        redis_url=redis_url,
        registry=registry.root,
        log_sessions=64,
        admin_token=TOKEN,
        redis_timeout_ms=500,
        max_wait_ms=2,
    )


def backfill_users(settings, ds, users, holdout=Holdout.TEST):
    async def go():
        client = redis_client(
            settings.model_copy(update={"redis_timeout_ms": 10_000}), settings.redis_url
        )
        try:
            gen = load_generation(settings.registry, "current", device="cpu", log_sessions=64)
            return await backfill(
                ds, state_store(settings, client), gen, users, holdout=holdout, progress=False
            )
        finally:
            await client.aclose()

    return run(go())


def offline_top_k(ds, registry, users, k=K):
    """The evaluation harness's scores for each user's TEST session: full recompute."""
    loaded = open_model(registry.root, "current")
    cfg = TrainConfig(**{**loaded.config["train"], "device": "cpu"})
    task = build_task(cfg, loaded.model, ds, torch.device("cpu"))
    scores = task.score(np.asarray(users), Split.TEST)  # (B, N+1), column 0 = padding
    top = torch.topk(scores, k, dim=1)
    return [
        ([loaded.item_ids[i - 1] for i in idx.tolist()], vals.tolist())
        for idx, vals in zip(top.indices, top.values, strict=True)
    ]


def recompute(registry, records: list[SessionRecord], now: int, k=K):
    """Interest vector by `SessionRec.forward` over the whole history, then exact top-k."""
    loaded = open_model(registry.root, "current")
    model, rows = loaded.model, {item: i + 1 for i, item in enumerate(loaded.item_ids)}
    max_items = loaded.config["train"]["max_items"]
    items, labels, segment, gaps, starts = [], [], [], [], []
    previous = None
    for n, r in enumerate(records):
        it = np.array([rows[i] for i in r.items if i in rows], dtype=np.int64)
        lab = np.array([lb for i, lb in zip(r.items, r.labels, strict=True) if i in rows])
        it, lab = cap_events(it, lab, max_items)
        items += it.tolist()
        labels += lab.tolist()
        segment += [n] * len(it)
        gaps.append(session_gap(r.started_at, previous))
        starts.append(r.started_at)
        previous = r.ended_at
    with torch.inference_mode():
        tokens = model.encode_sessions(
            Sessions(
                torch.tensor(items),
                torch.tensor(labels),
                torch.tensor(segment),
                torch.tensor(gaps, dtype=torch.float32),
                torch.tensor(starts),
                len(records),
            )
        )
        lengths = torch.tensor([len(records)])
        gap = torch.tensor([float(session_gap(now, previous))])
        query = model.encode_queries(gap, torch.tensor([now]), None)
        u = model(pad_tokens(tokens, lengths), lengths, query[None], lengths[:, None])[0, 0]
        scores = loaded.item_vectors @ u
    top = torch.topk(scores, k)
    return [loaded.item_ids[i] for i in top.indices.tolist()], top.values.tolist()


def long_history_users(ds, n, minimum=12):
    users = [u for u in range(ds.n_users) if len(ds.user_sessions(u)) >= minimum]
    assert len(users) >= n, "the synthetic world should have long histories"
    return users[:n]


def recommend(client, user, **body):
    r = client.post("/recommend/session", json={"user_id": user, "k": K, **body})
    assert r.status_code == 200, r.text
    RecommendResponse.model_validate(r.json())  # the documented schema, strictly
    return r.json()


def test_backfilled_users_get_the_offline_models_top_k(world, settings):
    ds, registry, _ = world
    users = long_history_users(ds, 6)
    report = backfill_users(settings, ds, users)
    assert report.caches == len(users)
    expected = offline_top_k(ds, registry, users)
    with LiveServer(settings) as server, server.client() as c:
        for u, (ids, scores) in zip(users, expected, strict=True):
            test_session = next(s for s in ds.user_sessions(u) if ds.sess_split[s] == Split.TEST)
            now = int(ds.sess_start[test_session])
            body = recommend(c, ds.user_ids[u], context={"timestamp": now})
            assert body["source"] == "state"
            assert [i["item_id"] for i in body["items"]] == ids
            np.testing.assert_allclose([i["score"] for i in body["items"]], scores, atol=1e-4)


def test_after_a_close_the_next_answer_equals_a_full_recompute(world, settings):
    ds, registry, _ = world
    (u,) = long_history_users(ds, 1, minimum=14)
    user = ds.user_ids[u]
    backfill_users(settings, ds, [u])
    history = user_sessions(ds, u, Holdout.TEST, limit=64)
    test_record = user_sessions(ds, u, Holdout.NONE, limit=64)[len(history)]
    with LiveServer(settings) as server, server.client() as c:
        r = c.post(
            "/sessions",
            json={
                "user_id": user,
                "session_id": test_record.session_id,
                "started_at": test_record.started_at,
                "ended_at": test_record.ended_at,
                "items": [
                    {"item_id": i, "label": lb}
                    for i, lb in zip(test_record.items, test_record.labels, strict=True)
                ],
            },
        )
        assert r.status_code == 200, r.text
        assert r.json()["appended"] is True and r.json()["cache"] == "appended"
        now = test_record.ended_at + 3600
        body = recommend(c, user, context={"timestamp": now})
    assert body["source"] == "state"
    ids, scores = recompute(registry, [*history, test_record], now)
    assert [i["item_id"] for i in body["items"]] == ids
    np.testing.assert_allclose([i["score"] for i in body["items"]], scores, atol=1e-4)


def test_concurrent_closes_with_duplicates_lose_nothing_and_keep_order(world, settings):
    ds, registry, _ = world
    rng = random.Random(0)
    users = [f"c{i}" for i in range(5)]
    item_ids = ds.item_ids[:50]
    unique = [
        {
            "user_id": user,
            "session_id": f"{user}-s{n}",
            "started_at": 1_760_000_000 + n * 7200,
            "ended_at": 1_760_000_000 + n * 7200 + 600,
            "items": [
                {"item_id": rng.choice(item_ids), "label": rng.randint(0, 1)} for _ in range(5)
            ],
        }
        for user in users
        for n in range(36)
    ]
    posts = unique + rng.sample(unique, 20)  # 200 closes, 10 % of them duplicates
    rng.shuffle(posts)

    async def close_all(server):
        async with server.async_client() as c:
            return await asyncio.gather(*(c.post("/sessions", json=p) for p in posts))

    with LiveServer(settings) as server:
        responses = run(close_all(server))
        assert [r.status_code for r in responses] == [200] * len(posts)
        assert sum(r.json()["appended"] for r in responses) == len(unique)
        states = run(_read_logs(settings, users))
        for user, state in zip(users, states, strict=True):
            mine = sorted((p for p in unique if p["user_id"] == user), key=lambda p: p["ended_at"])
            assert [s.session_id for s in state.sessions] == [p["session_id"] for p in mine]
            seqs = [r.json()["seq"] for r in responses if r.json()["user_id"] == user]
            assert state.seq == max(seqs) == min(seqs) + len(mine) - 1  # one per unique close
        with server.client() as c:
            for user, state in zip(users, states, strict=True):
                now = state.sessions[-1].ended_at + 60
                body = recommend(c, user, context={"timestamp": now})
                assert body["source"] in ("state", "rebuilt")
                ids, _ = recompute(registry, state.sessions, now)
                assert [i["item_id"] for i in body["items"]] == ids


async def _read_logs(settings, users):
    client = redis_client(settings, settings.redis_url)
    try:
        return await state_store(settings, client).get_many(users)
    finally:
        await client.aclose()


def test_redis_down_degrades_to_cold_start_and_recovers_without_restart(world, tmp_path):
    ds, registry, _ = world
    redis_proc = RedisProcess(tmp_path / "redis").start()
    try:
        settings = Settings(
            redis_url=redis_proc.url, registry=registry.root, log_sessions=64, redis_timeout_ms=200
        )
        with LiveServer(settings) as server, server.client() as c:
            session = {
                "user_id": "f1",
                "session_id": "a",
                "ended_at": 1_760_000_000,
                "items": [{"item_id": ds.item_ids[0], "label": 1}],
            }
            assert c.post("/sessions", json=session).status_code == 200
            assert recommend(c, "f1")["source"] == "state"
            redis_proc.stop()
            body = recommend(c, "f1")
            assert body["source"] == "degraded" and len(body["items"]) == K
            r = c.post("/sessions", json={**session, "session_id": "b"})
            assert r.status_code == 503 and "retry" in r.json()["detail"]
            assert c.get("/readyz").status_code == 503
            redis_proc.start()  # same port, same AOF: the session survived
            wait_until(lambda: recommend(c, "f1")["source"] == "state", 10, "state again")
            assert c.get("/readyz").json()["ready"] is True
    finally:
        redis_proc.stop()


def test_a_stale_model_version_is_rebuilt_then_hit(world, settings):
    ds, registry, versions = world
    (u,) = long_history_users(ds, 1)
    backfill_users(settings, ds, [u])
    user = ds.user_ids[u]

    async def plant_foreign_version():
        client = redis_client(settings, settings.redis_url)
        store = state_store(settings, client)
        try:
            (head,) = await store.get_kv_many([user])
            from dataclasses import replace

            foreign = replace(head.kv, model_version="some-older-model")
            assert await store.put_kv_many([(user, foreign)]) == [True]
        finally:
            await client.aclose()

    run(plant_foreign_version())
    with LiveServer(settings) as server, server.client() as c:
        first = recommend(c, user, context={"timestamp": 1_770_000_000})
        second = recommend(c, user, context={"timestamp": 1_770_000_000})
    assert first["source"] == "rebuilt"
    assert second["source"] == "state"
    assert first["items"] == second["items"]


@pytest.mark.parametrize(
    ("body", "field", "message"),
    [
        ({"user_id": "u1", "k": 0}, "k", "greater than or equal to 1"),
        ({"user_id": "u1", "k": 1001}, "k", "less than or equal to 1000"),
        ({"user_id": "u{1}"}, "user_id", "should match pattern"),
        ({"user_id": "x" * 129}, "user_id", "should match pattern"),
        ({"user_id": "u1", "exclude": ["i"] * 1001}, "exclude", "at most 1000 items"),
        ({"user_id": "u1", "surprise": 1}, "surprise", "Extra inputs are not permitted"),
        ({"user_id": "u1", "context": {"timestamp": "yesterday"}}, "timestamp", "datetime"),
        ({"k": 5}, "user_id", "Field required"),
    ],
)
def test_invalid_recommend_requests_get_422_naming_the_field(settings, body, field, message):
    with LiveServer(settings) as server, server.client() as c:
        r = c.post("/recommend/session", json=body)
    assert r.status_code == 422
    errors = r.json()["detail"]
    assert any(field in map(str, e["loc"]) and message in e["msg"] for e in errors), errors


def test_invalid_sessions_and_ids_get_422(settings):
    good = {
        "user_id": "u1",
        "session_id": "s",
        "ended_at": 1_760_000_000,
        "items": [{"item_id": "a"}],
    }
    with LiveServer(settings) as server, server.client() as c:
        r = c.post("/sessions", json={**good, "started_at": 1_770_000_000})
        assert r.status_code == 422 and "started_at is after ended_at" in r.text
        r = c.post("/sessions", json={**good, "items": []})
        assert r.status_code == 422 and "at least 1 item" in r.text
        r = c.post("/sessions", json={**good, "items": [{"item_id": "a", "label": 2}]})
        assert r.status_code == 422 and "label" in r.text
        r = c.post("/sessions", content=b"{not json", headers={"content-type": "application/json"})
        assert r.status_code == 422 and "JSON" in r.text
        assert c.delete("/users/bad%20id").status_code == 422
        r = c.post(
            "/sessions", content=b"x" * 300_000, headers={"content-type": "application/json"}
        )
        assert r.status_code == 413 and "larger than" in r.json()["detail"]


def test_unknown_items_are_reported_not_fatal_and_duplicates_are_no_ops(world, settings):
    ds, _, _ = world
    session = {
        "user_id": "u7",
        "session_id": "s1",
        "ended_at": "2026-12-01T10:00:00Z",
        "items": [{"item_id": ds.item_ids[3], "label": 1}, {"item_id": "never-seen", "label": 0}],
    }
    with LiveServer(settings) as server, server.client() as c:
        first = c.post("/sessions", json=session).json()
        again = c.post("/sessions", json=session).json()
        assert first["appended"] is True and first["unknown_items"] == ["never-seen"]
        assert again["appended"] is False and again["cache"] == "unchanged"
        assert again["seq"] == first["seq"] > 0
        assert c.delete("/users/u7").json() == {"user_id": "u7", "deleted": True}
        assert c.delete("/users/u7").json() == {"user_id": "u7", "deleted": False}
        assert recommend(c, "u7")["source"] == "cold_start"


def test_exclusions_and_context_are_applied(world, settings):
    ds, _, _ = world
    with LiveServer(settings) as server, server.client() as c:
        base = recommend(c, "nobody")
        top = [i["item_id"] for i in base["items"]]
        body = recommend(
            c,
            "nobody",
            exclude=top[:3],
            context={"items": [{"item_id": top[3], "label": 1}, {"item_id": top[4]}]},
        )
        got = [i["item_id"] for i in body["items"]]
        assert len(got) == K and not set(got) & set(top[:5])
        kept = recommend(
            c, "nobody", exclude_seen=False, context={"items": [{"item_id": top[3], "label": 1}]}
        )
        assert len(kept["items"]) == K
        everything = recommend(c, "nobody", k=1000)
        assert len(everything["items"]) == ds.n_items and everything["exhausted"] is True


def test_admin_reload_needs_the_token_and_swaps_the_generation(world, settings):
    _, _, versions = world
    with LiveServer(settings) as server, server.client() as c:
        assert c.get("/model").json()["version"] == versions[0]
        r = c.post("/admin/reload", json={"model_ref": versions[1]})
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        r = c.post("/admin/reload", headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401
        auth = {"Authorization": f"Bearer {TOKEN}"}
        r = c.post("/admin/reload", json={"model_ref": versions[1]}, headers=auth)
        assert r.status_code == 200, r.text
        assert r.json() == {"previous_version": versions[0], "model_version": versions[1]}
        assert c.get("/model").json()["version"] == versions[1]
        assert recommend(c, "nobody")["model_version"] == versions[1]


def test_a_broken_artifact_is_refused_and_the_old_generation_keeps_serving(
    world, settings, tmp_path
):
    _, registry, versions = world
    copy = tmp_path / "artifacts"
    shutil.copytree(registry.root, copy)
    weights = copy / versions[1] / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with LiveServer(settings.model_copy(update={"registry": copy})) as server, server.client() as c:
        r = c.post("/admin/reload", json={"model_ref": versions[1]}, headers=auth)
        assert r.status_code == 422
        assert "reload refused" in r.json()["detail"] and "model.safetensors" in r.json()["detail"]
        assert c.get("/model").json()["version"] == versions[0]
        assert recommend(c, "nobody")["model_version"] == versions[0]
        metrics = c.get("/metrics").text
    assert 'sessionrec_reloads_total{result="refused"} 1.0' in metrics


def test_admin_is_disabled_without_a_configured_token(world, settings):
    with (
        LiveServer(settings.model_copy(update={"admin_token": None})) as server,
        server.client() as c,
    ):
        r = c.post("/admin/reload", headers={"Authorization": "Bearer anything"})
    assert r.status_code == 403 and "disabled" in r.json()["detail"]


def test_ops_endpoints_request_ids_and_metrics(settings):
    with LiveServer(settings) as server, server.client() as c:
        assert c.get("/healthz").json() == {"status": "ok"}
        ready = c.get("/readyz").json()
        assert ready == {
            "ready": True,
            "model_loaded": True,
            "warmed_up": True,
            "redis": True,
            "model_version": ready["model_version"],
        }
        r = c.post("/recommend/session", json={"user_id": "u1"}, headers={"X-Request-ID": "abc-1"})
        assert r.headers["x-request-id"] == "abc-1" and r.json()["request_id"] == "abc-1"
        assert len(r.json()["items"]) == 50
        generated = c.get("/healthz", headers={"X-Request-ID": "bad id!"}).headers["x-request-id"]
        assert len(generated) == 32
        model = c.get("/model").json()
        assert model["n_items"] == 300 and model["index"]["kind"] == "flat"
        metrics = c.get("/metrics").text
    for line in (
        'sessionrec_request_seconds_count{endpoint="/recommend/session",method="POST",status="200"}',
        'sessionrec_recommendations_total{source="cold_start"}',
        'sessionrec_batch_size_count{batcher="recommend"}',
        'sessionrec_queue_wait_seconds_count{batcher="recommend"}',
        "sessionrec_generation_info{version=",
    ):
        assert line in metrics, line


def test_embedded_redis_is_used_when_no_url_is_given(world, tmp_path):
    _, registry, _ = world
    settings = Settings(registry=registry.root, data_dir=tmp_path / "state", log_sessions=64)
    session = {
        "user_id": "e1",
        "session_id": "a",
        "ended_at": 1_760_000_000,
        "items": [{"item_id": "x"}],
    }
    with LiveServer(settings) as server, server.client() as c:
        assert c.post("/sessions", json=session).json()["appended"] is True
    with LiveServer(settings) as server, server.client() as c:  # persisted under data_dir
        assert c.post("/sessions", json=session).json()["appended"] is False
        assert recommend(c, "e1")["source"] == "state"
    assert (tmp_path / "state" / "appendonlydir").exists() or any(
        (tmp_path / "state").glob("*.aof*")
    )


def test_a_model_needing_more_log_than_kept_is_refused(world):
    _, registry, _ = world
    from service.runner import GenerationError

    with pytest.raises(GenerationError, match="needs a raw log of 9 sessions"):
        load_generation(registry.root, "current", device="cpu", log_sessions=8)


def _session(user, sid, ended, items, started=None):
    body = {"user_id": user, "session_id": sid, "ended_at": ended, "items": items}
    return body if started is None else {**body, "started_at": started}


def test_a_late_out_of_order_session_rebuilds_the_cache_in_time_order(world, settings):
    ds, registry, _ = world
    items = [{"item_id": ds.item_ids[i], "label": i % 2} for i in range(6)]
    t0 = 1_760_000_000
    with LiveServer(settings) as server, server.client() as c:
        for sid, ended in (("a", t0 + 1000), ("c", t0 + 9000)):
            assert (
                c.post("/sessions", json=_session("o1", sid, ended, items[:3])).status_code == 200
            )
        late = c.post("/sessions", json=_session("o1", "b", t0 + 5000, items[3:], t0 + 4000))
        assert late.json()["cache"] == "rebuilt"
        body = recommend(c, "o1", context={"timestamp": t0 + 20_000})
    assert body["source"] == "state"
    (state,) = run(_read_logs(settings, ["o1"]))
    assert [s.session_id for s in state.sessions] == ["a", "b", "c"]
    ids, _ = recompute(registry, state.sessions, t0 + 20_000)
    assert [i["item_id"] for i in body["items"]] == ids


def test_the_service_runs_on_a_redis_cluster(world, redis_cluster_url):
    ds, registry, _ = world
    settings = Settings(
        redis_url=redis_cluster_url,
        redis_cluster=True,
        registry=registry.root,
        log_sessions=64,
        redis_timeout_ms=1000,
    )
    items = [{"item_id": ds.item_ids[i], "label": 1} for i in range(4)]
    users = [f"cl{i}" for i in range(6)]  # spread over the three primaries by hash tag
    with LiveServer(settings) as server, server.client() as c:
        for user in users:
            for n in range(3):
                r = c.post(
                    "/sessions", json=_session(user, f"s{n}", 1_760_000_000 + n * 3600, items)
                )
                assert r.status_code == 200 and r.json()["cache"] in ("appended", "rebuilt")
        for user in users:
            assert recommend(c, user)["source"] == "state"
        assert c.get("/readyz").json()["ready"] is True
        assert c.delete(f"/users/{users[0]}").json()["deleted"] is True
        assert recommend(c, users[0])["source"] == "cold_start"


def test_a_streamed_body_over_the_limit_gets_413(settings):
    def chunks():
        for _ in range(20):
            yield b"x" * 20_000  # chunked: no Content-Length to check up front

    with LiveServer(settings) as server, server.client() as c:
        r = c.post("/sessions", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and "larger than 262144 bytes" in r.json()["detail"]


def test_an_unreachable_redis_cluster_at_boot_degrades_instead_of_failing(world):
    from tests.servers import free_port

    _, registry, _ = world
    settings = Settings(
        redis_url=f"redis://127.0.0.1:{free_port()}",
        redis_cluster=True,
        registry=registry.root,
        log_sessions=64,
        redis_timeout_ms=200,
    )
    with LiveServer(settings) as server, server.client() as c:
        body = recommend(c, "anyone")
        assert body["source"] == "degraded" and len(body["items"]) == K
        assert c.get("/readyz").status_code == 503
        r = c.post("/sessions", json=_session("anyone", "s", 1_760_000_000, [{"item_id": "a"}]))
        assert r.status_code == 503
