"""Parity: the incremental path (prefill + step) equals the full recompute, in fp32 ≤ 1e-4."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from model_store.model import KVCache, ModelConfig, SessionRec, Sessions, full_mask, pad_tokens

ATOL = 1e-4


def make_model(window: int = 4, *, layers: int = 2, dim: int = 16, heads: int = 2, seed: int = 0):
    torch.manual_seed(seed)
    config = ModelConfig(
        n_items=50,
        n_categories=5,
        dim=dim,
        n_layers=layers,
        n_heads=heads,
        window=window,
        dropout=0.0,
    )
    model = SessionRec(config).eval()
    model.item_tower.item_category.copy_(torch.randint(0, 6, (51,)))
    return model


def random_history(lengths: list[int], dim: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    lens = torch.tensor(lengths, dtype=torch.long)
    tokens = torch.randn(int(lens.sum()), dim, generator=g)
    queries = torch.randn(len(lengths), dim, generator=g)
    return pad_tokens(tokens, lens), lens, queries


def reference(model, sessions, lengths, queries):
    """Full recompute: one query per user at position len(history)."""
    return model(sessions, lengths, queries[:, None], lengths[:, None])[:, 0]


@pytest.mark.parametrize(
    "lengths",
    [[1], [4], [11], [0], [1, 4, 0, 7, 3, 12]],
    ids=["T=1", "T=W", "T>W", "empty", "mixed"],
)
@torch.inference_mode()
def test_query_step_after_prefill_equals_full_forward(lengths):
    model = make_model(window=4)
    sessions, lens, queries = random_history(lengths, 16)
    cache = model.prefill(sessions, lens)
    assert cache.lengths.tolist() == [min(n, 4) for n in lengths]
    got, same = model.step(queries, cache, append=False)
    assert same is cache
    torch.testing.assert_close(got, reference(model, sessions, lens, queries), atol=ATOL, rtol=0)


@pytest.mark.parametrize("lengths", [[1], [4], [5], [13], [1, 4, 2, 9, 5]])
@torch.inference_mode()
def test_append_then_query_equals_full_forward(lengths):
    """Close session T on a cache of T-1 sessions: K/V and the next query match a recompute."""
    model = make_model(window=4)
    sessions, lens, queries = random_history(lengths, 16)
    before = model.prefill(sessions, lens - 1)
    last = sessions[torch.arange(len(lengths)), lens - 1]
    _, after = model.step(last, before, append=True)
    full = model.prefill(sessions, lens)
    assert after.lengths.tolist() == full.lengths.tolist()
    for b in range(len(lengths)):
        for got, want in zip(after.user(b), full.user(b), strict=True):
            torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    got, _ = model.step(queries, after, append=False)
    torch.testing.assert_close(got, reference(model, sessions, lens, queries), atol=ATOL, rtol=0)


@torch.inference_mode()
def test_appending_every_session_from_empty_equals_prefill_past_window():
    model = make_model(window=3, layers=3)
    lengths = [9, 2, 6]
    sessions, lens, queries = random_history(lengths, 16)
    cache = KVCache.empty(model.config, len(lengths))
    for t in range(max(lengths)):
        # Users whose history is shorter stop appending: compute for all, keep only theirs.
        _, grown = model.step(sessions[:, t], cache, append=True)
        active = (t < lens)[None, :, None, None, None]
        cache = KVCache(
            torch.where(active, grown.k, cache.k),
            torch.where(active, grown.v, cache.v),
            torch.where(t < lens, grown.lengths, cache.lengths),
        )
    full = model.prefill(sessions, lens)
    for b in range(len(lengths)):
        for got, want in zip(cache.user(b), full.user(b), strict=True):
            torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    got, _ = model.step(queries, cache, append=False)
    torch.testing.assert_close(got, reference(model, sessions, lens, queries), atol=ATOL, rtol=0)


@settings(max_examples=25, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 10), min_size=1, max_size=5),
    window=st.integers(1, 6),
    layers=st.integers(1, 3),
    seed=st.integers(0, 2**16),
)
@torch.inference_mode()
def test_parity_sweep(lengths, window, layers, seed):
    model = make_model(window=window, layers=layers, seed=seed)
    sessions, lens, queries = random_history(lengths, 16, seed=seed + 1)
    got, _ = model.step(queries, model.prefill(sessions, lens), append=False)
    torch.testing.assert_close(got, reference(model, sessions, lens, queries), atol=ATOL, rtol=0)


@torch.inference_mode()
def test_window_bounds_what_a_query_sees():
    """Past W, sessions older than the window change nothing once they fall out of every band."""
    model = make_model(window=2, layers=1)
    sessions, lens, queries = random_history([6], 16)
    base = reference(model, sessions, lens, queries)
    changed = sessions.clone()
    bump = torch.randn(16, generator=torch.Generator().manual_seed(7))  # LayerNorm eats constants
    changed[0, 0] += bump  # with one layer, session 0 is outside the last query's window
    torch.testing.assert_close(reference(model, changed, lens, queries), base, atol=ATOL, rtol=0)
    changed[0, 5] += bump  # the newest session is inside it
    assert (reference(model, changed, lens, queries) - base).abs().max() > 1e-3


@torch.inference_mode()
def test_batched_equals_unbatched():
    model = make_model(window=4)
    lengths = [3, 0, 8]
    sessions, lens, queries = random_history(lengths, 16)
    batched, _ = model.step(queries, model.prefill(sessions, lens), append=False)
    for b, n in enumerate(lengths):
        one, _ = model.step(
            queries[b : b + 1],
            model.prefill(sessions[b : b + 1, : max(n, 1)], lens[b : b + 1]),
            append=False,
        )
        torch.testing.assert_close(one[0], batched[b], atol=ATOL, rtol=0)


@torch.inference_mode()
def test_cache_stack_round_trip():
    model = make_model(window=4)
    sessions, lens, _ = random_history([2, 6, 1], 16)
    cache = model.prefill(sessions, lens)
    rebuilt = KVCache.stack([cache.user(b) for b in range(3)], model.config)
    torch.testing.assert_close(rebuilt.k, cache.k)
    torch.testing.assert_close(rebuilt.v, cache.v)
    assert rebuilt.lengths.tolist() == cache.lengths.tolist()


@torch.inference_mode()
def test_session_encoder_ragged_batch_equals_one_at_a_time_and_sees_negatives():
    model = make_model()
    items = torch.tensor([3, 7, 9, 1, 4, 4, 2])
    labels = torch.tensor([1, 0, 0, 1, 1, 0, 0])
    segment = torch.tensor([0, 0, 0, 1, 1, 2, 2])
    gap = torch.tensor([-1.0, 3600.0, 60.0])
    start = torch.tensor([1_700_000_000, 1_700_003_600, 1_700_010_000])
    batch = model.encode_sessions(Sessions(items, labels, segment, gap, start, 3))
    for s in range(3):
        sel = segment == s
        one = model.encode_sessions(
            Sessions(
                items[sel],
                labels[sel],
                torch.zeros(int(sel.sum()), dtype=torch.long),
                gap[s : s + 1],
                start[s : s + 1],
                1,
            )
        )
        torch.testing.assert_close(one[0], batch[s], atol=ATOL, rtol=0)
    # Same items, one negative flipped to positive: the token must differ.
    flipped = labels.clone()
    flipped[1] = 1
    other = model.encode_sessions(Sessions(items, flipped, segment, gap, start, 3))
    assert (other[0] - batch[0]).abs().max() > 1e-4


def test_mask_never_lets_a_token_see_a_query_or_padding():
    lengths = torch.tensor([2, 0])
    query_pos = torch.tensor([[0, 1, 2], [0, 0, 0]])
    mask = full_mask(lengths, query_pos, S=3, window=8)[:, 0]  # (B, 6, 6)
    assert not mask[:, :3, 3:].any()  # sessions never see queries
    assert not mask[0, 3, :3].any()  # the cold-start query sees no session
    assert mask[0, 5, :2].all() and not mask[0, 5, 2]  # padding session 2 is never seen
    assert not mask[1, 3:, :3].any()  # a user without history: queries see no session


@pytest.mark.parametrize("layers", [2, 3])
@torch.inference_mode()
def test_history_beyond_layers_times_window_changes_nothing(layers):
    """An interest vector depends on exactly the last n_layers·W sessions: a recompute over
    them equals one over the full history, and one session fewer does not."""
    W = 3
    model = make_model(window=W, layers=layers)
    T, field = 17, layers * W
    sessions, lens, queries = random_history([T], 16)
    full = reference(model, sessions, lens, queries)
    tail = sessions[:, T - field :]
    got = reference(model, tail, torch.tensor([field]), queries)
    torch.testing.assert_close(got, full, atol=ATOL, rtol=0)
    cache_full, cache_tail = (
        model.prefill(sessions, lens),
        model.prefill(tail, torch.tensor([field])),
    )
    # The cached K/V of the last W sessions need (n_layers - 1)·W sessions before them.
    for got_kv, want_kv in zip(cache_tail.user(0), cache_full.user(0), strict=True):
        torch.testing.assert_close(got_kv, want_kv, atol=ATOL, rtol=0)
    short = sessions[:, T - field + 1 :]
    assert (reference(model, short, torch.tensor([field - 1]), queries) - full).abs().max() > 1e-5


@torch.inference_mode()
def test_training_forward_with_real_tokens_equals_serving_path():
    """The training path — encoded sessions, several query tokens per user with time and
    in-session context, one forward — equals serving each query by prefill + step."""
    model = make_model(window=3, layers=2)
    g = torch.Generator().manual_seed(5)
    lengths = torch.tensor([5, 2])
    n = int(lengths.sum())
    per_session = torch.randint(1, 5, (n,), generator=g)
    segment = torch.repeat_interleave(torch.arange(n), per_session)
    items = torch.randint(1, 51, (len(segment),), generator=g)
    labels = torch.randint(0, 2, (len(segment),), generator=g)
    gap = torch.rand(n, generator=g) * 1e5
    start = torch.randint(1_600_000_000, 1_700_000_000, (n,), generator=g)
    tokens = pad_tokens(
        model.encode_sessions(Sessions(items, labels, segment, gap, start, n)), lengths
    )
    # Three queries per user at positions 0 (cold start), 1 and len; two carry context.
    query_pos = torch.tensor([[0, 1, 5], [0, 1, 2]])
    ctx_seg = torch.tensor([1, 1, 4])
    context = Sessions(
        torch.tensor([7, 9, 11]),
        torch.tensor([1, 0, 1]),
        ctx_seg,
        torch.zeros(6),
        torch.zeros(6, dtype=torch.long),
        6,
    )
    q_gap = torch.rand(6, generator=g) * 1e4
    q_start = torch.randint(1_600_000_000, 1_700_000_000, (6,), generator=g)
    queries = model.encode_queries(q_gap, q_start, context)  # (6, d)
    trained = model(tokens, lengths, queries.view(2, 3, -1), query_pos).reshape(6, -1)
    for b in range(2):
        for j in range(3):
            p = int(query_pos[b, j])
            cache = model.prefill(tokens[b : b + 1, : max(p, 1)], torch.tensor([p]))
            served, _ = model.step(queries[b * 3 + j : b * 3 + j + 1], cache, append=False)
            torch.testing.assert_close(served[0], trained[b * 3 + j], atol=ATOL, rtol=0)


@torch.inference_mode()
def test_query_time_setting_decides_which_time_features_reach_the_query_token():
    torch.manual_seed(0)
    gaps, hours = torch.tensor([-1.0, 60.0, 86_400.0]), torch.tensor([0, 3_600 * 5, 3_600 * 13])
    same_gap = torch.full((3,), 600.0)
    for query_time, gap_matters, hour_matters in [
        ("gap+hour", True, True),
        ("gap", True, False),
        ("none", False, False),
    ]:
        config = ModelConfig(n_items=50, dim=16, window=4, query_time=query_time)
        model = SessionRec(config).eval()
        by_gap = model.encode_queries(gaps, torch.zeros(3, dtype=torch.long), None)
        by_hour = model.encode_queries(same_gap, hours, None)
        assert (not torch.allclose(by_gap[0], by_gap[2])) == gap_matters, query_time
        assert (not torch.allclose(by_hour[0], by_hour[2])) == hour_matters, query_time
    with pytest.raises(ValueError, match="query_time"):
        ModelConfig(n_items=50, query_time="weekday")
