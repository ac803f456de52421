"""The Redis state store and its byte formats, against a real redis-server."""

from __future__ import annotations

import asyncio
import random

import numpy as np
import pytest
import redis.asyncio as aioredis

from service.state import (
    KVDType,
    KVState,
    SessionRecord,
    StateFormatError,
    decode_kv,
    decode_session,
    encode_kv,
    encode_session,
)
from service.store import RedisStateStore, check_user_id


def record(sid: str, ended_at: int, items=("a", "b"), labels=(1, 0)) -> SessionRecord:
    return SessionRecord(sid, ended_at - 60, ended_at, tuple(items), tuple(labels))


def kv_state(seq: int, n: int = 3, version: str = "m1") -> KVState:
    rng = np.random.default_rng(seq)
    k = rng.standard_normal((2, 2, n, 4)).astype(np.float32)
    return KVState(version, seq, 1_700_000_000 + seq, k, -k)


# ------------------------------------------------------------------------------- formats


def test_session_record_round_trip_with_unicode_ids():
    r = SessionRecord("s-1", 100, 200, ("item-ü", "N123"), (1, 0))
    assert decode_session(encode_session(r)) == r


@pytest.mark.parametrize("dtype", list(KVDType))
def test_kv_round_trip(dtype):
    state = kv_state(7)
    got = decode_kv(encode_kv(state, dtype))
    assert (got.model_version, got.log_seq) == ("m1", 7)
    tol = 0 if dtype is KVDType.FLOAT32 else 2e-3
    np.testing.assert_allclose(got.k, state.k, atol=tol)
    np.testing.assert_allclose(got.v, state.v, atol=tol)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda b: b"XXXX" + b[4:], "magic"),
        (lambda b: b[:4] + b"\x09\x00" + b[6:], "version 9"),
        (lambda b: b[:-1], "truncated"),
        (lambda b: b + b"\x00", "trailing"),
    ],
)
@pytest.mark.parametrize(
    ("data", "decode"),
    [(encode_session(record("s", 10)), decode_session), (encode_kv(kv_state(1)), decode_kv)],
    ids=["session", "kv"],
)
def test_corrupt_records_are_refused_with_a_reason(data, decode, mutate, message):
    with pytest.raises(StateFormatError, match=message):
        decode(mutate(data))


def test_a_kv_record_is_not_read_as_a_session():
    with pytest.raises(StateFormatError, match="expected a SESSION record"):
        decode_session(encode_kv(kv_state(1)))


@pytest.mark.parametrize("bad", ["", "a{b}", "x" * 129, "a b", "ü"])
def test_user_ids_that_could_forge_keys_are_refused(bad):
    with pytest.raises(ValueError, match="invalid user id"):
        check_user_id(bad)


# ------------------------------------------------------------------------------- store


def run(coro):
    return asyncio.run(coro)


async def make_store(url: str, **kw) -> RedisStateStore:
    # A bounded pool that waits for a free connection: 200 concurrent calls share 20.
    pool = aioredis.BlockingConnectionPool.from_url(url, max_connections=20, timeout=10)
    client = aioredis.Redis(connection_pool=pool)
    return RedisStateStore(client, **{"max_sessions": 4, **kw})


def test_append_is_idempotent_ordered_by_end_time_and_bounded(redis_url):
    async def scenario():
        store = await make_store(redis_url, max_ids=16)
        seqs = []
        for i, ended in enumerate([300, 100, 200, 500, 400, 600]):
            result = await store.append_session("u1", record(f"s{i}", ended))
            assert result.appended
            seqs.append(result.seq)
        assert seqs == list(range(seqs[0], seqs[0] + 6))  # +1 per session
        again = await store.append_session("u1", record("s5", 600))
        assert not again.appended and again.seq == seqs[-1]
        (state,) = await store.get_many(["u1"])
        assert [s.ended_at for s in state.sessions] == [300, 400, 500, 600]  # last 4 by time
        assert state.seq == seqs[-1] and state.kv is None
        # An evicted session's id is still remembered (max_ids > max_sessions): a late
        # duplicate is not re-added.
        assert not (await store.append_session("u1", record("s1", 100))).appended
        (state,) = await store.get_many(["u1"])
        assert [s.ended_at for s in state.sessions] == [300, 400, 500, 600]
        await store.client.aclose()

    run(scenario())


def test_concurrent_closes_lose_nothing_and_duplicates_add_nothing(redis_url):
    """200 concurrent closes over 5 users, 10 % of them duplicates."""

    async def scenario():
        store = await make_store(redis_url, max_sessions=64)
        rng = random.Random(0)
        unique = [(f"u{i % 5}", f"s{i}", 1_000 + i) for i in range(180)]
        calls = unique + rng.sample(unique, 20)
        rng.shuffle(calls)
        results = await asyncio.gather(
            *(store.append_session(u, record(s, t)) for u, s, t in calls)
        )
        assert sum(r.appended for r in results) == 180
        states = await store.get_many([f"u{i}" for i in range(5)])
        for state in states:
            want = sorted((t, s) for u, s, t in unique if u == state.user_id)
            assert [(r.ended_at, r.session_id) for r in state.sessions] == want
            mine = [
                r.seq for r, (u, _, _) in zip(results, calls, strict=True) if u == state.user_id
            ]
            assert state.seq == max(mine) == min(mine) + len(want) - 1  # no gap, no repeat
        await store.client.aclose()

    run(scenario())


def test_kv_write_is_compare_and_set_on_the_log_sequence(redis_url):
    async def scenario():
        store = await make_store(redis_url, kv_dtype=KVDType.FLOAT16)
        first = (await store.append_session("u1", record("s1", 100))).seq
        assert await store.put_kv_many([("u1", kv_state(first))]) == [True]
        await store.append_session("u1", record("s2", 200))
        # A cache computed from the older log cannot overwrite anything now.
        assert await store.put_kv_many([("u1", kv_state(first, n=4))]) == [False]
        (state,) = await store.get_many(["u1"])
        assert state.seq == first + 1 and state.kv.log_seq == first  # readers see it is stale
        assert state.kv.k.dtype == np.float32 and state.kv.k.shape == (2, 2, 3, 4)
        await store.client.aclose()

    run(scenario())


def test_ttl_is_set_on_every_key_and_delete_forgets_the_user(redis_url):
    async def scenario():
        store = await make_store(redis_url, ttl_seconds=3600)
        seq = (await store.append_session("u1", record("s1", 100))).seq
        assert await store.put_kv_many([("u1", kv_state(seq))]) == [True]
        for key in store.keys("u1"):
            assert 3500 < await store.client.ttl(key) <= 3600  # read TTL, no waiting
        # The cache never outlives its log: it takes the sequence key's remaining TTL.
        await store.client.expire(store.keys("u1")[2], 60)
        assert await store.put_kv_many([("u1", kv_state(seq))]) == [True]
        assert 0 < await store.client.ttl(store.keys("u1")[3]) <= 60
        assert await store.delete_user("u1")
        (state,) = await store.get_many(["u1"])
        assert state.sessions == [] and state.seq == 0 and state.kv is None
        assert not await store.delete_user("u1")
        await store.client.aclose()

    run(scenario())


def test_a_deleted_users_new_log_never_matches_an_old_cache(redis_url):
    """Sequences restart from the server clock, not from 1: a write-back computed before a
    DELETE (or before expiry) cannot land on the user's next life, and no cache survives it."""

    async def scenario():
        store = await make_store(redis_url)
        old = (await store.append_session("u1", record("s1", 100))).seq
        assert await store.put_kv_many([("u1", kv_state(old))]) == [True]
        assert await store.delete_user("u1")
        assert await store.put_kv_many([("u1", kv_state(old))]) == [False]  # no log: refused
        new = (await store.append_session("u1", record("s9", 900))).seq
        assert new > old
        assert await store.put_kv_many([("u1", kv_state(old))]) == [False]  # in-flight, stale
        await store.client.set(store.keys("u1")[3], encode_kv(kv_state(old)))  # a leftover
        await store.client.delete(store.keys("u1")[2])  # ... the log's sequence expired
        await store.append_session("u1", record("s10", 1000))
        (state,) = await store.get_many(["u1"])
        assert state.kv is None  # a new log drops whatever cache was left
        await store.client.aclose()

    run(scenario())


def test_a_corrupt_cache_reads_as_missing_not_as_an_error(redis_url):
    async def scenario():
        store = await make_store(redis_url)
        await store.append_session("u1", record("s1", 100))
        await store.client.set(store.keys("u1")[3], b"garbage")
        (state,) = await store.get_many(["u1"])
        assert state.kv is None and len(state.sessions) == 1
        await store.client.aclose()

    run(scenario())


def test_the_same_contract_holds_on_a_three_node_cluster(redis_cluster_url):
    from redis.asyncio.cluster import RedisCluster

    async def scenario():
        client = RedisCluster.from_url(redis_cluster_url)
        store = RedisStateStore(client, max_sessions=8)
        await store.load_scripts()
        users = [f"user-{i}" for i in range(12)]  # spread over the three nodes' slots
        slots = {client.keyslot(store.keys(u)[0]) for u in users}
        assert len({client.get_node_from_key(store.keys(u)[0]).port for u in users}) == 3
        for u in users:
            assert len({client.keyslot(k) for k in store.keys(u)}) == 1  # co-located
        results = await asyncio.gather(
            *(store.append_session(u, record(f"s{j}", 100 + j)) for u in users for j in range(3)),
            *(store.append_session(u, record("s0", 100)) for u in users),  # duplicates
        )
        assert sum(r.appended for r in results) == 36
        heads = await store.get_kv_many(users)
        assert await store.put_kv_many([(h.user_id, kv_state(h.seq)) for h in heads]) == [True] * 12
        states = await store.get_many(users)
        assert all(len(s.sessions) == 3 and s.kv.log_seq == s.seq for s in states)
        assert [s.seq for s in states] == [h.seq for h in heads]
        assert len(slots) > 1
        await client.aclose()

    run(scenario())
