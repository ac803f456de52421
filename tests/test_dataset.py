"""sessionize rules on hand-made logs, a reference-implementation property test, and the
on-disk format (round trip, refusals)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from training.dataset import (
    FORMAT_VERSION,
    DatasetError,
    PreparedDataset,
    Split,
    sessionize,
    validate_events,
)


def events(rows: list[tuple], columns=("user_id", "session_id", "item_id", "timestamp", "label")):
    return pd.DataFrame(rows, columns=list(columns))


def sessions_of(ds: PreparedDataset, user: str) -> list[list[tuple[str, int]]]:
    """A user's sessions as [[(item_id, label), ...], ...]."""
    u = ds.user_ids.index(user)
    out = []
    for s in ds.user_sessions(u):
        items, labels = ds.session(s)
        out.append([(ds.item_ids[i - 1], int(lab)) for i, lab in zip(items, labels, strict=True)])
    return out


# --------------------------------------------------------------------------- sessions


def test_explicit_session_ids_group_per_user_and_order_by_start():
    ds = sessionize(
        events(
            [
                ("u1", "B", "x", 100, 1),
                ("u1", "A", "y", 200, 0),
                ("u1", "B", "z", 150, 0),
                ("u1", "A", "x", 210, 1),
                ("u2", "A", "w", 50, 1),  # same session id, other user: another session
            ]
        )
    )
    assert ds.user_ids == ["u1", "u2"]
    assert sessions_of(ds, "u1") == [[("x", 1), ("z", 0)], [("y", 0), ("x", 1)]]
    assert sessions_of(ds, "u2") == [[("w", 1)]]
    assert ds.sess_start.tolist() == [100, 200, 50]
    assert ds.sess_end.tolist() == [150, 210, 50]
    assert ds.n_sessions == 3


def test_time_gap_sessions_cut_only_when_gap_exceeds_threshold():
    rows = [
        ("u1", None, "a", 1000, 1),
        ("u1", None, "b", 0, 0),  # unsorted input
        ("u1", None, "c", 1000 + 1800, 1),  # gap == threshold: same session
        ("u1", None, "d", 2800 + 1801, 0),  # gap > threshold: new session
        ("u2", None, "a", 5, 1),
    ]
    ds = sessionize(events(rows), gap_seconds=1800)
    assert sessions_of(ds, "u1") == [[("b", 0), ("a", 1), ("c", 1)], [("d", 0)]]
    assert sessions_of(ds, "u2") == [[("a", 1)]]
    assert ds.meta["params"]["gap_seconds"] == 1800


def test_session_id_column_absent_uses_time_gap():
    frame = events(
        [("u", "x", 0, 1), ("u", "y", 10_000, 1)], ("user_id", "item_id", "timestamp", "label")
    )
    assert sessions_of(sessionize(frame), "u") == [[("x", 1)], [("y", 1)]]


def test_rows_without_session_id_fall_back_to_gap_next_to_explicit_sessions():
    rows = [
        ("u", "S", "a", 0, 1),
        ("u", "S", "b", 9_000, 1),  # explicit ids are never cut by time
        ("u", None, "c", 100, 0),
        ("u", np.nan, "d", 20_000, 1),
    ]
    assert sessions_of(sessionize(events(rows)), "u") == [
        [("a", 1), ("b", 1)],
        [("c", 0)],
        [("d", 1)],
    ]


def test_session_ties_break_on_end_time_then_session_id():
    rows = [
        ("u", "s2", "a", 0, 1),
        ("u", "s1", "b", 0, 1),
        ("u", "s0", "c", 0, 1),
        ("u", "s0", "c2", 50, 1),  # s0 ends last
    ]
    assert sessions_of(sessionize(events(rows)), "u") == [
        [("b", 1)],
        [("a", 1)],
        [("c", 1), ("c2", 1)],
    ]


def test_dedupe_positive_wins_and_first_position_is_kept():
    rows = [
        ("u", "s", "x", 0, 0),
        ("u", "s", "y", 1, 0),
        ("u", "s", "x", 2, 1),  # x positive through a later event, stays first
        ("u", "s", "y", 3, 0),
        ("u", "s", "z", 4, 1),
        ("u", "s", "z", 5, 0),  # a later shown-only event does not unset a positive
    ]
    ds = sessionize(events(rows))
    assert sessions_of(ds, "u") == [[("x", 1), ("y", 0), ("z", 1)]]
    assert ds.meta["counts"]["n_duplicate_events"] == 3
    assert ds.sess_end.tolist() == [5]  # the session spans all its events


def test_items_numbered_by_first_appearance_users_sorted_categories_first_non_null():
    frame = pd.DataFrame(
        {
            "user_id": ["b", "b", "a", "a"],
            "session_id": ["1", "1", "1", "1"],
            "item_id": ["q", "p", "p", "r"],
            "timestamp": [0, 1, 5, 6],
            "label": [1, 1, 1, 0],
            "category": [None, "cp", "cp2", None],
        }
    )
    ds = sessionize(frame)
    assert ds.user_ids == ["a", "b"]
    assert ds.item_ids == ["p", "r", "q"]  # sorted log: user a first
    assert ds.category_ids == ["cp2"]  # p's first non-null category in log order
    assert ds.item_category.tolist() == [0, 1, 0, 0]


# --------------------------------------------------------------------------- split


def test_split_last_target_test_previous_val_later_sessions_dropped():
    t = 10_000
    rows = [
        ("u", "1", "a", 1 * t, 1),
        ("u", "2", "b", 2 * t, 0),  # no positive: kept as context, TRAIN
        ("u", "3", "c", 3 * t, 1),
        ("u", "4", "d", 4 * t, 1),  # VAL
        ("u", "5", "e", 5 * t, 0),  # between VAL and TEST: TRAIN context
        ("u", "6", "f", 6 * t, 1),  # TEST
        ("u", "7", "g", 7 * t, 0),  # after TEST: dropped
        ("v", "1", "a", 1 * t, 1),
        ("v", "2", "b", 2 * t, 1),
        ("v", "3", "c", 3 * t, 0),  # only 2 target sessions: all TRAIN
    ]
    ds = sessionize(events(rows))
    u, v = ds.user_sessions(0), ds.user_sessions(1)
    assert ds.sess_split[u].tolist() == [Split.TRAIN] * 3 + [Split.VAL, Split.TRAIN, Split.TEST]
    assert ds.sess_split[v].tolist() == [Split.TRAIN] * 3
    assert ds.sess_start[u].tolist() == [i * t for i in range(1, 7)]
    assert "g" not in ds.item_ids
    counts = ds.meta["counts"]
    assert (counts["n_val"], counts["n_test"], counts["n_dropped_sessions"]) == (1, 1, 1)
    assert counts["n_sessions"] == 9 and counts["n_target_sessions"] == 6


def test_meta_counts_and_params():
    ds = sessionize(
        events([("u", "s", "x", 0, 1), ("u", "s", "y", 1, 0)]), source="unit", params={"k": 1}
    )
    assert ds.meta["format"] == "sessionrec-prepared"
    assert ds.meta["format_version"] == FORMAT_VERSION
    assert ds.meta["source"] == "unit"
    assert ds.meta["params"] == {"gap_seconds": 1800, "k": 1}
    c = ds.meta["counts"]
    assert (c["n_users"], c["n_items"], c["n_sessions"], c["n_events"]) == (1, 2, 1, 2)
    assert (c["n_positive"], c["n_negative"]) == (1, 1)


# --------------------------------------------------------------------------- reference


def reference(frame: pd.DataFrame, gap: int) -> dict[str, list[tuple]]:
    """Slow, obvious sessionize: per user [(start, end, [(item, label)], split), ...]."""
    out = {}
    for user in sorted(frame["user_id"].unique()):
        rows = frame[frame["user_id"] == user].reset_index()
        groups: dict[tuple, list] = {}
        gap_rows = sorted(
            (r.timestamp, r.index, r) for r in rows.itertuples() if pd.isna(r.session_id)
        )
        n_gap, last_ts = -1, None
        for ts, _, r in gap_rows:
            if last_ts is None or ts - last_ts > gap:
                n_gap += 1
            last_ts = ts
            groups.setdefault((1, n_gap), []).append(r)
        for r in rows.itertuples():
            if not pd.isna(r.session_id):
                groups.setdefault((0, r.session_id), []).append(r)
        sessions = []
        for key, members in groups.items():
            members.sort(key=lambda r: (r.timestamp, r.index))
            labels: dict[str, int] = {}
            for r in members:
                labels[r.item_id] = max(labels.get(r.item_id, 0), r.label)
            start, end = members[0].timestamp, max(r.timestamp for r in members)
            sessions.append((start, end, key, list(labels.items())))
        sessions.sort(key=lambda s: (s[0], s[1], s[2]))
        targets = [i for i, s in enumerate(sessions) if any(lab for _, lab in s[3])]
        split = [Split.TRAIN] * len(sessions)
        if len(targets) >= 3:
            split[targets[-1]], split[targets[-2]] = Split.TEST, Split.VAL
            sessions, split = sessions[: targets[-1] + 1], split[: targets[-1] + 1]
        out[user] = [(s[0], s[1], s[3], sp) for s, sp in zip(sessions, split, strict=True)]
    return out


def as_reference(ds: PreparedDataset) -> dict[str, list[tuple]]:
    out = {}
    for u, user in enumerate(ds.user_ids):
        out[user] = [
            (
                int(ds.sess_start[s]),
                int(ds.sess_end[s]),
                [(ds.item_ids[i - 1], int(lab)) for i, lab in zip(*ds.session(s), strict=True)],
                Split(ds.sess_split[s]),
            )
            for s in ds.user_sessions(u)
        ]
    return out


row_strategy = st.tuples(
    st.sampled_from(["u1", "u2", "u10"]),
    st.sampled_from([None, None, "s1", "s2", "s10"]),
    st.sampled_from(["a", "b", "c", "d", "e"]),
    st.integers(0, 20_000),
    st.integers(0, 1),
)


@settings(max_examples=150, deadline=None)
@given(rows=st.lists(row_strategy, min_size=1, max_size=40), gap=st.sampled_from([0, 500, 1800]))
def test_sessionize_matches_reference_implementation(rows, gap):
    frame = events(rows)
    ds = sessionize(frame, gap_seconds=gap)
    assert as_reference(ds) == reference(frame, gap)
    first_seen = list(dict.fromkeys(ds.item_ids[i - 1] for i in ds.ev_item))
    assert first_seen == ds.item_ids  # numbered by first appearance, every item used


# --------------------------------------------------------------------------- validation


def test_validate_events_messages():
    with pytest.raises(ValueError, match="missing required column.*label"):
        validate_events(pd.DataFrame({"user_id": ["u"], "item_id": ["i"], "timestamp": [1]}))
    frame = events([("u", "s", "i", 1, 2)])
    with pytest.raises(ValueError, match="label must be 0 or 1"):
        validate_events(frame)
    frame = events([("u", "s", "i", "noon", 1)])
    with pytest.raises(ValueError, match="timestamp must hold integers; found 'noon'"):
        validate_events(frame)
    frame = events([(None, "s", "i", 1, 1)])
    with pytest.raises(ValueError, match="user_id has 1 null"):
        validate_events(frame)


def test_validate_events_normalises_ids_and_dtypes():
    frame = pd.DataFrame(
        {
            "user_id": [7, 8],
            "session_id": [3.0, np.nan],
            "item_id": [1, 2],
            "timestamp": [1.0, 2.0],
            "label": [True, False],
        }
    )
    out = validate_events(frame)
    assert out["user_id"].tolist() == ["7", "8"]
    assert out["session_id"].iloc[0] == "3" and pd.isna(out["session_id"].iloc[1])
    assert out["timestamp"].dtype == np.int64 and out["label"].dtype == np.int8


def test_empty_log_and_negative_gap_refused():
    with pytest.raises(ValueError, match="empty"):
        sessionize(events([]))
    with pytest.raises(ValueError, match="gap_seconds"):
        sessionize(events([("u", "s", "i", 1, 1)]), gap_seconds=-1)


# --------------------------------------------------------------------------- on disk


@pytest.fixture
def small() -> PreparedDataset:
    frame = pd.DataFrame(
        {
            "user_id": ["u", "u", "u", "u", "v"],
            "session_id": ["1", "2", "3", "4", "1"],
            "item_id": ["a", "b", "c", "a", "d"],
            "timestamp": [0, 5000, 10000, 15000, 0],
            "label": [1, 1, 0, 1, 1],
            "category": ["x", "y", None, "x", "z"],
        }
    )
    return sessionize(frame, source="unit")


def test_save_load_round_trip(tmp_path, small):
    small.save(tmp_path / "ds")
    assert sorted(p.name for p in (tmp_path / "ds").iterdir()) == [
        "arrays.npz",
        "categories.json",
        "items.json",
        "meta.json",
        "users.json",
    ]
    loaded = PreparedDataset.load(tmp_path / "ds")
    assert loaded == small
    assert loaded.ev_item.dtype == np.int32 and loaded.sess_split.dtype == np.int8
    with np.load(tmp_path / "ds" / "arrays.npz", allow_pickle=False) as npz:
        assert all(npz[name].dtype != object for name in npz.files)


def test_equality_sees_array_differences(small):
    other = PreparedDataset(**{**small.__dict__, "ev_label": 1 - small.ev_label})
    assert other != small


def rewrite_meta(path, **changes):
    meta = json.loads((path / "meta.json").read_text())
    meta.update(changes)
    (path / "meta.json").write_text(json.dumps(meta))


def rewrite_arrays(path, **changes):
    with np.load(path / "arrays.npz", allow_pickle=False) as npz:
        arrays = {name: npz[name] for name in npz.files}
    arrays.update(changes)
    arrays = {k: v for k, v in arrays.items() if v is not None}
    np.savez(path / "arrays.npz", **arrays)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda p: rewrite_meta(p, format="other"), "format is 'other', expected"),
        (lambda p: rewrite_meta(p, format_version=99), "format_version 99 is not supported"),
        (lambda p: (p / "meta.json").unlink(), "meta.json is missing"),
        (lambda p: (p / "items.json").write_text("{"), "items.json: not valid JSON"),
        (lambda p: rewrite_arrays(p, ev_label=None), "missing array.*ev_label"),
        (
            lambda p: rewrite_arrays(p, sess_offsets=np.array([0, 1, 2], dtype=np.int64)),
            "sess_offsets: expected length n_sessions\\+1",
        ),
        (
            lambda p: rewrite_arrays(p, ev_item=np.array([1, 2, 3, 1, 9], dtype=np.int32)),
            "ev_item: values must be in \\[1, 4\\]",
        ),
        (
            lambda p: rewrite_arrays(p, ev_item=np.array([1, 2, 3, 1, 4], dtype=np.int64)),
            "ev_item: expected dtype int32, got int64",
        ),
        (
            lambda p: rewrite_arrays(p, sess_user=np.array([1, 0, 0, 0, 0], dtype=np.int32)),
            "sess_user: does not match user_offsets",
        ),
        (
            lambda p: rewrite_arrays(p, sess_split=np.array([0, 0, 5, 0, 0], dtype=np.int8)),
            "sess_split: values outside Split",
        ),
        (
            lambda p: rewrite_meta(p, counts={"n_users": 3}),
            "meta counts n_users=3 but arrays hold 2",
        ),
    ],
)
def test_load_refuses_inconsistent_datasets(tmp_path, small, change, message):
    small.save(tmp_path)
    change(tmp_path)
    with pytest.raises(DatasetError, match=message):
        PreparedDataset.load(tmp_path)


def test_load_never_unpickles(tmp_path, small):
    small.save(tmp_path)
    rewrite_arrays(tmp_path, ev_item=np.array([1, 2, 3, 1, 4], dtype=object))
    with pytest.raises(DatasetError, match="cannot read arrays"):
        PreparedDataset.load(tmp_path)


def test_dataset_error_is_a_value_error():
    assert issubclass(DatasetError, ValueError)
