"""Next-session retrieval metrics: hand-computed cases and brute-force references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from training.metrics import (
    KS,
    MetricAccumulator,
    format_table,
    in_session_auc,
    retrieval_metrics,
    topk_scores,
)

L3 = 1 / math.log2(3)  # discount at rank 1 (0-based)
L4 = 1 / math.log2(4)
L6 = 1 / math.log2(6)


def test_hand_computed_examples() -> None:
    topk = np.array(
        [
            [1, 2, 3, 4, 5],  # hits at ranks 1 and 4
            [7, 8, 9, 10, 11],  # |P| = 8 > k: every slot a hit
            [4, -1, -1, -1, -1],  # catalogue exhausted after one item
            [9, 8, 3, 2, 1],  # duplicate positive counts once
            [20, 21, 22, 23, 24],  # no hit
        ]
    )
    positives = [
        np.array([2, 5]),
        np.arange(7, 15),
        np.array([4, 6]),
        np.array([3, 3]),
        np.array([1]),
    ]
    m = retrieval_metrics(topk, positives, ks=(1, 3, 5))
    expected = {
        "recall@1": [0, 1 / 8, 1 / 2, 0, 0],
        "recall@3": [1 / 2, 3 / 8, 1 / 2, 1, 0],
        "recall@5": [1, 5 / 8, 1 / 2, 1, 0],
        "ndcg@1": [0, 1, 1, 0, 0],
        "ndcg@3": [L3 / (1 + L3), 1, 1 / (1 + L3), L4, 0],
        "ndcg@5": [(L3 + L6) / (1 + L3), 1, 1 / (1 + L3), L4, 0],
        "hr@1": [0, 1, 1, 0, 0],
        "hr@3": [1, 1, 1, 1, 0],
        "hr@5": [1, 1, 1, 1, 0],
    }
    assert set(m) == set(expected)
    for key, values in expected.items():
        np.testing.assert_allclose(m[key], values, rtol=1e-12, err_msg=key)
        assert m[key].dtype == np.float64 and m[key].shape == (5,)


def test_default_ks_keys() -> None:
    topk = np.arange(1, 101)[None, :]
    m = retrieval_metrics(topk, [np.array([100])])
    assert sorted(m) == sorted(f"{n}@{k}" for n in ("recall", "ndcg", "hr") for k in KS)
    assert m["recall@50"][0] == 0 and m["recall@100"][0] == 1
    assert m["ndcg@100"][0] == pytest.approx(1 / math.log2(101))


@pytest.mark.parametrize(
    ("topk", "positives", "message"),
    [
        (np.zeros((2, 5), dtype=int), [np.array([1])], "2 users"),
        (np.zeros((1, 5), dtype=int), [np.array([], dtype=int)], "at least one positive"),
        (np.zeros((1, 5), dtype=int), [np.array([-1])], ">= 0"),
        (np.zeros((1, 4), dtype=int), [np.array([1])], "topk width 4"),
        (np.zeros(5, dtype=int), [np.array([1])], "2-D"),
    ],
)
def test_retrieval_metrics_validates(topk, positives, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        retrieval_metrics(topk, positives, ks=(5,))


def _reference(row: list[int], pos: set[int], k: int) -> tuple[float, float, float]:
    gains = [1.0 if item in pos else 0.0 for item in row[:k]]
    dcg = sum(g / math.log2(r + 2) for r, g in enumerate(gains))
    idcg = sum(1 / math.log2(r + 2) for r in range(min(len(pos), k)))
    return sum(gains) / len(pos), dcg / idcg, float(any(gains))


@settings(max_examples=60, deadline=None)
@given(data=st.data(), batch=st.integers(1, 6), n_items=st.integers(6, 30))
def test_matches_per_user_reference(data: st.DataObject, batch: int, n_items: int) -> None:
    rows, positives = [], []
    for _ in range(batch):
        rows.append(data.draw(st.permutations(range(n_items)))[:5])
        positives.append(
            np.array(data.draw(st.lists(st.integers(0, n_items - 1), min_size=1, max_size=8)))
        )
    m = retrieval_metrics(np.array(rows), positives, ks=(2, 5))
    for b in range(batch):
        for k in (2, 5):
            recall, ndcg, hr = _reference(rows[b], set(positives[b].tolist()), k)
            assert m[f"recall@{k}"][b] == pytest.approx(recall)
            assert m[f"ndcg@{k}"][b] == pytest.approx(ndcg)
            assert m[f"hr@{k}"][b] == hr


def _brute_auc(pos: list[float], neg: list[float]) -> float:
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


scores = st.lists(st.integers(-5, 5).map(float) | st.floats(-3, 3), max_size=12)


@settings(max_examples=200, deadline=None)
@given(pos=scores, neg=scores)
def test_auc_matches_pairwise_count(pos: list[float], neg: list[float]) -> None:
    auc = in_session_auc(np.array(pos), np.array(neg))
    if not pos or not neg:
        assert math.isnan(auc)
    else:
        assert auc == pytest.approx(_brute_auc(pos, neg))


def test_auc_hand_examples() -> None:
    assert in_session_auc(np.array([3.0, 2.0]), np.array([1.0, 0.0])) == 1.0
    assert in_session_auc(np.array([0.0]), np.array([1.0])) == 0.0
    assert in_session_auc(np.array([1.0]), np.array([1.0, 0.0])) == 0.75


def test_accumulator() -> None:
    acc = MetricAccumulator()
    assert acc.result() == {"users": 0, "auc": None, "auc_sessions": 0}
    acc.add({"recall@10": np.array([1.0, 0.0]), "hr@10": np.array([1.0, 1.0])})
    acc.add({"recall@10": np.array([0.5]), "hr@10": np.array([0.0])})
    acc.add_auc(1.0)
    acc.add_auc(math.nan)
    acc.add_auc(0.5)
    result = acc.result()
    assert result["recall@10"] == pytest.approx(0.5)
    assert result["hr@10"] == pytest.approx(2 / 3)
    assert (result["users"], result["auc"], result["auc_sessions"]) == (3, 0.75, 2)
    with pytest.raises(ValueError, match="keys changed"):
        acc.add({"recall@10": np.array([1.0])})
    with pytest.raises(ValueError, match="differ in length"):
        acc.add({"recall@10": np.array([1.0]), "hr@10": np.array([1.0, 0.0])})


def test_accumulator_without_auc() -> None:
    acc = MetricAccumulator()
    acc.add({"ndcg@50": np.array([0.25, 0.75])})
    assert acc.result() == {"ndcg@50": 0.5, "users": 2, "auc": None, "auc_sessions": 0}


@settings(max_examples=50, deadline=None)
@given(
    batch=st.integers(1, 4),
    n_items=st.integers(2, 40),
    k_frac=st.floats(0.01, 1.0),
    excl_p=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
)
def test_topk_scores_respects_exclusion(
    batch: int, n_items: int, k_frac: float, excl_p: float, seed: int
) -> None:
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(batch, n_items, generator=g)
    exclude = torch.rand(batch, n_items, generator=g) < excl_p
    k = max(1, round(k_frac * n_items))
    top = topk_scores(scores, k, exclude)
    assert top.shape == (batch, k) and top.dtype == torch.int64
    for b in range(batch):
        eligible = [i for i in range(1, n_items) if not exclude[b, i]]
        expected = sorted(eligible, key=lambda i: -scores[b, i].item())[:k]
        got = top[b].tolist()
        assert got[: len(expected)] == expected  # best first, never 0 or excluded
        assert got[len(expected) :] == [-1] * (k - len(expected))


def test_topk_scores_basic() -> None:
    scores = torch.tensor([[9.0, 1.0, 5.0, 3.0], [9.0, 8.0, 7.0, 6.0]])
    exclude = torch.tensor([[False, False, False, False], [False, True, False, False]])
    assert topk_scores(scores, 2).tolist() == [[2, 3], [1, 2]]
    assert topk_scores(scores, 2, exclude).tolist() == [[2, 3], [2, 3]]
    assert topk_scores(scores, 4, exclude).tolist() == [[2, 3, 1, -1], [2, 3, -1, -1]]
    assert scores[0, 0] == 9.0  # input untouched
    with pytest.raises(ValueError, match="k=5"):
        topk_scores(scores, 5)
    with pytest.raises(ValueError, match="bool tensor"):
        topk_scores(scores, 2, exclude.float())


def test_format_table() -> None:
    rows = {
        "sessionrec": {"recall@10": 0.12345, "ndcg@10": 0.2, "hr@10": 0.5, "auc": 0.71},
        "sasrec-baseline": {"recall@10": 0.1, "ndcg@10": 0.15, "hr@10": 0.4, "auc": None},
    }
    table = format_table(rows, ks=(10,))
    lines = table.splitlines()
    assert lines[0].split() == ["model", "recall@10", "ndcg@10", "hr@10", "auc"]
    assert lines[2].split() == ["sessionrec", "0.1235", "0.2000", "0.5000", "0.7100"]
    assert lines[3].split() == ["sasrec-baseline", "0.1000", "0.1500", "0.4000", "—"]
    assert len({len(line) for line in lines}) == 1  # aligned columns
    full = format_table(rows)
    assert "recall@100" in full and full.count("—") == 6 + 7  # missing @50/@100, auc None
