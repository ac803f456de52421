"""Loaders: the CSV contract everywhere, the real datasets when ../shared/datasets exists."""

from __future__ import annotations

import pandas as pd
import pytest

from training.dataset import PreparedDataset, Split
from training.loaders import (
    DATASETS_DIR,
    Source,
    datasets_dir,
    load_csv,
    load_globo,
    load_mind,
    load_taobao,
    prepare,
)


def require(folder: str):
    path = datasets_dir() / folder
    if not path.is_dir():
        pytest.skip(f"../shared/datasets not found: {path} is absent")
    return path


# --------------------------------------------------------------------------- CSV


CANONICAL = pd.DataFrame(
    {
        "user_id": ["u1", "u1", "u2", "007"],
        "session_id": ["s1", None, "s1", "9"],
        "item_id": ["i1", "i2", "01", "i1"],
        "timestamp": [1_700_000_000, 1_700_000_100, 1_700_000_050, 5],
        "label": [1, 0, 1, 0],
        "category": ["c", None, "d", "c"],
    }
)


def test_load_csv_round_trip(tmp_path):
    path = tmp_path / "events.csv"
    CANONICAL.to_csv(path, index=False)
    loaded = load_csv(path)
    assert loaded["user_id"].tolist() == ["u1", "u1", "u2", "007"]  # ids stay strings
    assert loaded["item_id"].tolist() == ["i1", "i2", "01", "i1"]
    assert loaded["session_id"].isna().tolist() == [False, True, False, False]
    assert loaded["timestamp"].dtype == "int64" and loaded["label"].dtype == "int8"
    expected = CANONICAL.astype({"label": "int8"})
    pd.testing.assert_frame_equal(loaded, expected, check_dtype=False)


def test_load_csv_with_other_separator_and_no_optional_columns(tmp_path):
    path = tmp_path / "events.tsv"
    CANONICAL[["user_id", "item_id", "timestamp", "label"]].to_csv(path, sep="\t", index=False)
    loaded = load_csv(path, sep="\t")
    assert list(loaded.columns) == ["user_id", "item_id", "timestamp", "label"]


def test_load_csv_names_missing_columns(tmp_path):
    path = tmp_path / "bad.csv"
    CANONICAL.drop(columns=["item_id", "label"]).to_csv(path, index=False)
    with pytest.raises(ValueError) as info:
        load_csv(path)
    message = str(info.value)
    assert str(path) in message
    assert "missing required column(s) item_id, label" in message
    assert "found user_id, session_id, timestamp, category" in message


def test_load_csv_names_bad_values(tmp_path):
    path = tmp_path / "bad.csv"
    CANONICAL.assign(label=[1, 0, 3, 0]).to_csv(path, index=False)
    with pytest.raises(ValueError, match=r"bad\.csv: column label must be 0 or 1; found \[3\]"):
        load_csv(path)
    CANONICAL.assign(timestamp=["1", "x", "3", "4"]).to_csv(path, index=False)
    with pytest.raises(ValueError, match="column timestamp must hold integers; found 'x'"):
        load_csv(path)


# --------------------------------------------------------------------------- prepare


def test_prepare_csv_saves_and_loads(tmp_path):
    path = tmp_path / "events.csv"
    CANONICAL.to_csv(path, index=False)
    ds = prepare("csv", tmp_path / "out", path=path, gap_seconds=60)
    assert PreparedDataset.load(tmp_path / "out") == ds
    assert ds.meta["source"] == "csv"
    assert ds.meta["params"] == {"gap_seconds": 60, "seed": 0, "path": str(path)}


def test_prepare_synthetic_passes_options_to_the_generator():
    ds = prepare("synthetic", n_users=30, n_items=100, seed=3)
    assert ds.n_users == 30 and ds.n_items <= 100
    assert ds.meta["params"]["n_users"] == 30 and ds.meta["params"]["seed"] == 3
    assert (ds.sess_split == Split.TEST).sum() > 20


def test_prepare_refuses_unknown_source_and_csv_without_path():
    with pytest.raises(ValueError, match="unknown source 'parquet'; use one of synthetic, "):
        prepare("parquet")
    with pytest.raises(ValueError, match="needs path="):
        prepare(Source.CSV)


def test_datasets_dir_default_and_override(monkeypatch, tmp_path):
    monkeypatch.delenv("SESSIONREC_DATASETS", raising=False)
    assert datasets_dir() == DATASETS_DIR
    assert DATASETS_DIR.parts[-2:] == ("shared", "datasets")
    monkeypatch.setenv("SESSIONREC_DATASETS", str(tmp_path))
    assert datasets_dir() == tmp_path


def test_missing_dataset_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset not found"):
        load_taobao(tmp_path / "nope.csv")


# --------------------------------------------------------------------------- real data


@pytest.mark.realdata
def test_taobao_users_sessions_and_positives():
    folder = require("taobao_userbehavior_subset")
    events = load_taobao()
    assert events["user_id"].nunique() == 814  # 815 minus the truncated user 100370
    assert "100370" not in set(events["user_id"])
    assert events["timestamp"].between(1511539200, 1512316800 - 1).all()

    raw = pd.read_csv(
        folder / "UserBehavior.csv", header=None, names=["u", "i", "c", "b", "t"], dtype=str
    ).dropna()
    raw = raw[(raw["u"] != "100370") & raw["t"].astype(int).between(1511539200, 1512316799)]
    assert len(events) == len(raw)
    assert events["label"].sum() == raw["b"].isin(["cart", "fav", "buy"]).sum()
    assert load_taobao(positives=("buy",))["label"].sum() == (raw["b"] == "buy").sum()

    ds = prepare("taobao")
    counts = ds.meta["counts"]
    assert ds.n_users == 814
    total_sessions = counts["n_sessions"] + counts["n_dropped_sessions"]
    assert 13_500 <= total_sessions <= 14_500  # README: 14,123 with 815 users, 30-min gap
    assert 4_500 <= counts["n_target_sessions"] <= 4_700  # README: 4,670
    assert counts["n_negative"] > counts["n_positive"] > 0  # pv-only items are negatives
    assert ds.n_categories > 2_000


@pytest.mark.realdata
def test_globo_session_ids_are_respected():
    folder = require("globo_news_clicks")
    manifest = pd.read_csv(folder / "MANIFEST.tsv", sep="\t").sort_values("file").head(3)
    events = load_globo(max_files=3)
    assert len(events) == manifest["rows"].sum()
    assert (events["label"] == 1).all()
    ds = prepare("globo", max_files=3, gap_seconds=1)  # a gap rule would cut far more
    assert ds.n_sessions == manifest["sessions"].sum()
    assert ds.meta["counts"]["n_negative"] == 0
    # Sessions ordered by start per user.
    for u in range(ds.n_users):
        starts = ds.sess_start[ds.user_sessions(u)]
        assert (starts[1:] >= starts[:-1]).all()


@pytest.mark.realdata
def test_globo_max_users_sample_is_seeded():
    require("globo_news_clicks")
    a = load_globo(max_files=2, max_users=100, seed=1)
    b = load_globo(max_files=2, max_users=100, seed=1)
    c = load_globo(max_files=2, max_users=100, seed=2)
    assert a["user_id"].nunique() == 100
    assert set(a["user_id"]) == set(b["user_id"]) != set(c["user_id"])


@pytest.mark.realdata
def test_mind_impressions_labels_and_history_sessions():
    require("mind_small_subset")
    plain = prepare("mind", history="none")
    counts = plain.meta["counts"]
    assert counts["n_sessions"] == 5_000  # one impression, one session
    assert counts["n_users"] == 4_637
    assert (counts["n_positive"], counts["n_negative"]) == (7_542, 181_817)

    events = load_mind()
    hist = events[events["session_id"].str.startswith("hist-")]
    assert (hist["label"] == 1).all()
    assert (hist["session_id"] == "hist-" + hist["user_id"]).all()
    first = events[~events.index.isin(hist.index)].groupby("user_id")["timestamp"].min()
    assert (hist["timestamp"] == hist["user_id"].map(first) - 86_400).all()
    assert events["category"].notna().any()

    with_history = prepare("mind")
    assert with_history.n_sessions == 5_000 + hist["user_id"].nunique()
    for user in hist["user_id"].unique()[:50]:
        u = with_history.user_ids.index(user)
        s = with_history.user_sessions(u)[0]  # the pseudo-session comes first
        assert with_history.sess_start[s] == first[user] - 86_400
        assert (with_history.session(s)[1] == 1).all()
