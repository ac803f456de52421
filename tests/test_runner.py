"""The runner's parity invariants, without Redis or HTTP: a cache grown one closed session at a
time equals a cache rebuilt from the log; fp16 storage stays within its documented tolerance;
padded buckets equal exact sizes."""

from __future__ import annotations

import numpy as np
import pytest

from service.backfill import Holdout, user_sessions
from service.runner import AppendJob, RecommendJob, Runner, load_generation
from service.state import KVDType, decode_kv, encode_kv
from tests.servers import build_registry


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    ds, registry, _ = build_registry(tmp_path_factory.mktemp("world"), versions=1)
    gen = load_generation(registry.root, "current", device="cpu", log_sessions=64)
    return ds, gen


def histories(ds, n=12, minimum=12):
    users = [u for u in range(ds.n_users) if len(ds.user_sessions(u)) >= minimum][:n]
    return [user_sessions(ds, u, Holdout.NONE, limit=64) for u in users]


def test_appending_one_session_at_a_time_equals_a_rebuild_past_the_window(world):
    ds, gen = world
    runner = Runner(max_batch=8)
    (log,) = histories(ds, n=1, minimum=14)
    assert len(log) > gen.history + 1  # eviction and the receptive-field cut both happen
    (kv,) = runner.rebuild(gen, [log[:1]], [1])
    for seq, record in enumerate(log[1:], start=2):
        (kv,) = runner.append(gen, [AppendJob(kv, record, seq)])
    (rebuilt,) = runner.rebuild(gen, [log], [len(log)])
    assert kv.k.shape == rebuilt.k.shape == (2, 2, gen.config.window, gen.config.head_dim)
    np.testing.assert_allclose(kv.k, rebuilt.k, atol=1e-5)
    np.testing.assert_allclose(kv.v, rebuilt.v, atol=1e-5)
    assert kv.last_ended_at == rebuilt.last_ended_at == log[-1].ended_at


def test_a_batch_equals_each_user_alone_and_buckets_pad_exactly(world):
    ds, gen = world
    runner = Runner(max_batch=16)
    logs = histories(ds, n=5)
    kvs = runner.rebuild(gen, logs, [len(x) for x in logs])
    jobs = [
        RecommendJob(now=log[-1].ended_at + 900, k=30, kv=kv)
        for log, kv in zip(logs, kvs, strict=True)
    ]
    together = runner.recommend(gen, jobs)  # 5 users padded to the bucket of 8
    for job, batched in zip(jobs, together, strict=True):
        (alone,) = runner.recommend(gen, [job])
        assert alone.item_ids == batched.item_ids
        np.testing.assert_allclose(alone.scores, batched.scores, atol=1e-5)


def test_fp16_storage_keeps_top_k_overlap_at_least_098(world):
    """Documented tolerance of KV storage in float16: interest vectors within 5e-3 (max abs)
    of fp32 and top-50 overlap ≥ 0.98 on average."""
    ds, gen = world
    runner = Runner(max_batch=64)
    logs = histories(ds, n=40, minimum=3)
    kvs = runner.rebuild(gen, logs, [len(x) for x in logs])
    halves = [decode_kv(encode_kv(kv, KVDType.FLOAT16)) for kv in kvs]
    assert len(encode_kv(kvs[0], KVDType.FLOAT16)) < 0.55 * len(encode_kv(kvs[0]))

    def jobs(states):
        return [
            RecommendJob(now=log[-1].ended_at + 600, k=50, kv=s)
            for log, s in zip(logs, states, strict=True)
        ]

    full = runner.recommend(gen, jobs(kvs))
    half = runner.recommend(gen, jobs(halves))
    overlap = [len(set(a.item_ids) & set(b.item_ids)) / 50 for a, b in zip(full, half, strict=True)]
    assert np.mean(overlap) >= 0.98, overlap
    fp32 = runner.interest(gen, jobs(kvs), kvs)
    fp16 = runner.interest(gen, jobs(halves), halves)
    assert np.abs(fp32 - fp16).max() <= 5e-3


def test_unknown_items_are_ignored_by_the_model_not_fatal(world):
    ds, gen = world
    runner = Runner(max_batch=4)
    (log,) = histories(ds, n=1)
    from dataclasses import replace

    noisy = [replace(r, items=(*r.items, "ghost"), labels=(*r.labels, 1)) for r in log]
    (clean_kv,) = runner.rebuild(gen, [log], [1])
    (noisy_kv,) = runner.rebuild(gen, [noisy], [1])
    np.testing.assert_allclose(clean_kv.k, noisy_kv.k, atol=1e-6)
    assert gen.unknown(noisy[0].items) == ["ghost"]
