"""The synthetic generator: determinism, shape of the log, and the planted structure."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from training.dataset import sessionize, validate_events
from training.synthetic import SyntheticConfig, generate_events, generate_world

SMALL = SyntheticConfig(n_users=300, n_items=500, n_topics=10)


@pytest.fixture(scope="module")
def default_events() -> pd.DataFrame:
    return generate_events(SyntheticConfig())


def test_deterministic_by_seed():
    a, b = generate_events(SMALL), generate_events(SMALL)
    pd.testing.assert_frame_equal(a, b)
    c = generate_events(SyntheticConfig(n_users=300, n_items=500, n_topics=10, seed=1))
    assert not a["item_id"].equals(c["item_id"])


def test_columns_dtypes_and_ids(default_events):
    ev = default_events
    assert list(ev.columns) == [
        "user_id", "session_id", "item_id", "timestamp", "label", "category"
    ]  # fmt: skip
    pd.testing.assert_frame_equal(validate_events(ev), ev)  # already canonical
    assert ev["timestamp"].dtype == np.int64 and ev["label"].dtype == np.int8
    assert ev["user_id"].nunique() == 2000
    assert ev["item_id"].nunique() <= 2000 and ev["category"].nunique() == 20
    assert not ev.duplicated(["session_id", "item_id"]).any()  # distinct items per session


def test_sessions_per_user_impressions_and_clicks(default_events):
    ev = default_events
    per_user = ev.groupby("user_id")["session_id"].nunique()
    assert per_user.min() >= 3
    assert 8 <= per_user.mean() <= 12
    per_session = ev.groupby("session_id")
    assert 17 <= per_session.size().mean() <= 21
    assert (per_session["label"].sum() > 0).mean() >= 0.9  # most sessions have a click


def test_time_increases_and_a_30_minute_gap_recovers_the_sessions(default_events):
    ev = default_events
    assert (ev.groupby("user_id")["timestamp"].diff().dropna() > 0).all()
    by_id = sessionize(ev)
    by_gap = sessionize(ev.drop(columns=["session_id"]), gap_seconds=1800)
    assert np.array_equal(by_id.sess_offsets, by_gap.sess_offsets)
    assert np.array_equal(by_id.ev_item, by_gap.ev_item)
    gaps = (by_id.sess_start[1:] - by_id.sess_end[:-1])[np.diff(by_id.sess_user) == 0]
    assert gaps.min() >= 3600 and np.median(gaps) > 6 * 3600  # hours to days


def test_categories_are_a_noisy_view_of_topics():
    config = SyntheticConfig()
    world = generate_world(config)
    agree = (world.item_category == world.item_topic).mean()
    assert 0.65 <= agree <= 0.8  # 30 % random categories, a few land on the right topic
    assert np.isclose(world.item_popularity.sum(), 1.0)
    top_share = np.sort(world.item_popularity)[::-1][:50].sum()
    assert top_share > 0.4  # Zipf: the top 2.5 % of items hold a large share


def test_config_is_validated():
    with pytest.raises(ValueError, match="topics_per_user must be <= n_topics"):
        SyntheticConfig(n_topics=2, topics_per_user=3)
    with pytest.raises(ValueError, match="switch must be in"):
        SyntheticConfig(switch=1.5)


def recall_at_50(scores: np.ndarray, targets: list[np.ndarray]) -> float:
    """Mean over users of |top-50 ∩ targets| / |targets|; scores (U, I)."""
    top = np.argpartition(-scores, 50, axis=1)[:, :50]
    return float(np.mean([np.isin(t, row).mean() for row, t in zip(top, targets, strict=True)]))


def test_planted_structure_topic_history_beats_popularity(default_events):
    """Next-session clicks are predictable from the topics of past clicks, not from popularity.

    History = every session but a user's last; target = the last session's clicks. The topic
    predictor ranks items by (the user's click share of the item's topic) x popularity.
    """
    config = SyntheticConfig()
    ev = default_events
    item = ev["item_id"].str[1:].astype(int).to_numpy()
    user = ev["user_id"].str[1:].astype(int).to_numpy()
    last = ev.groupby("user_id")["session_id"].transform("max").to_numpy()
    is_last = ev["session_id"].to_numpy() == last
    click = ev["label"].to_numpy() == 1
    hist, target = click & ~is_last, click & is_last

    popularity = np.bincount(item[hist], minlength=config.n_items) + 1.0
    targets = [item[target & (user == u)] for u in range(config.n_users)]
    keep = np.array([len(t) > 0 for t in targets])
    targets = [t for t in targets if len(t)]

    def topic_scores(item_group: np.ndarray, n_groups: int) -> np.ndarray:
        counts = np.zeros((config.n_users, n_groups))
        np.add.at(counts, (user[hist], item_group[item[hist]]), 1.0)
        share = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1.0)
        return (share[:, item_group] * popularity)[keep]  # (U, I)

    pop_recall = recall_at_50(np.tile(popularity, (keep.sum(), 1)), targets)
    world = generate_world(config)
    category_recall = recall_at_50(topic_scores(world.item_category, config.n_topics), targets)
    topic_recall = recall_at_50(topic_scores(world.item_topic, config.n_topics), targets)
    # Observed (noisy) categories already beat popularity by a wide margin; latent topics more.
    assert category_recall > 1.5 * pop_recall
    assert topic_recall > 2.0 * pop_recall
    assert topic_recall > category_recall
