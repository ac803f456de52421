"""The prepared dataset: an event log cut into per-user session sequences, as flat arrays.

Everything downstream (training, evaluation, backfill) reads a `PreparedDataset`; nothing reads
raw logs. It is a CSR-style layout, three levels deep:

    users     --user_offsets-->  sessions  --sess_offsets-->  events
    (U,)                         (S,)                         (E,)

so a user's history is a contiguous slice of sessions and a session a contiguous slice of
events, which makes batching and windowing index arithmetic rather than Python objects.

Trade-offs that live here:

- **Dedupe per session.** An item appears once per session. Positive wins over shown (a `pv`
  followed by a `buy` is a positive) and the item keeps its first position. SessionRec pools a
  session into one token, so repeats would only re-weight the mean.
- **Split by target sessions, per user** (leave-last-out). A *target* session has at least one
  positive. For a user with >= 3 target sessions the last is TEST, the one before is VAL and
  everything else is TRAIN; sessions after the TEST session are dropped because they would be
  the future of the test query. Users with fewer targets are all TRAIN. Sessions with no
  positives are kept: shown-but-ignored items are context the model should see.
- **Item vocabulary from the kept events only**, so every internal item has at least one event
  and index 0 stays free for padding.
- **On disk: JSON for ids and metadata, one `.npz` of numeric arrays** read with
  `allow_pickle=False`, validated on load. Never pickle.
"""

from __future__ import annotations

import datetime as dt
import enum
import json
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import pandas as pd

FORMAT = "sessionrec-prepared"
FORMAT_VERSION = 1

REQUIRED_COLUMNS = ("user_id", "item_id", "timestamp", "label")
OPTIONAL_COLUMNS = ("session_id", "category")
CANONICAL_ORDER = ("user_id", "session_id", "item_id", "timestamp", "label", "category")

_ARRAY_DTYPES = {
    "item_category": np.int32,
    "user_offsets": np.int64,
    "sess_user": np.int32,
    "sess_start": np.int64,
    "sess_end": np.int64,
    "sess_split": np.int8,
    "sess_offsets": np.int64,
    "ev_item": np.int32,
    "ev_label": np.int8,
}
_ID_FILES = {"user_ids": "users.json", "item_ids": "items.json", "category_ids": "categories.json"}


class DatasetError(ValueError):
    """A prepared dataset is malformed, inconsistent or of an unsupported format."""


class Split(enum.IntEnum):
    """Which evaluation split a session belongs to (stored as int8 in `sess_split`)."""

    TRAIN = 0
    VAL = 1
    TEST = 2


@dataclass(frozen=True, eq=False)
class PreparedDataset:
    """Sessions of users as flat arrays; see the module docstring and docs/DATA.md.

    Construction validates shapes, dtypes and index ranges and raises `DatasetError`.
    Equality compares every field (arrays element-wise, dtypes included).
    """

    meta: dict
    user_ids: list[str]
    item_ids: list[str]
    category_ids: list[str]
    item_category: np.ndarray  # int32 (n_items+1,); 0 = unknown, [0] = padding
    user_offsets: np.ndarray  # int64 (U+1,)
    sess_user: np.ndarray  # int32 (S,)
    sess_start: np.ndarray  # int64 (S,) Unix seconds
    sess_end: np.ndarray  # int64 (S,) Unix seconds
    sess_split: np.ndarray  # int8 (S,) Split
    sess_offsets: np.ndarray  # int64 (S+1,)
    ev_item: np.ndarray  # int32 (E,) in 1..n_items
    ev_label: np.ndarray  # int8 (E,) 1 positive / 0 shown

    def __post_init__(self) -> None:
        _validate(self)

    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    @property
    def n_items(self) -> int:
        """Number of real items; internal item indices run 1..n_items (0 is padding)."""
        return len(self.item_ids)

    @property
    def n_sessions(self) -> int:
        return len(self.sess_user)

    @property
    def n_categories(self) -> int:
        """Number of real categories; category indices run 1..n_categories (0 is unknown)."""
        return len(self.category_ids)

    @property
    def n_events(self) -> int:
        return len(self.ev_item)

    def session(self, s: int) -> tuple[np.ndarray, np.ndarray]:
        """(items, labels) of session `s`, as views into the event arrays."""
        a, b = self.sess_offsets[s], self.sess_offsets[s + 1]
        return self.ev_item[a:b], self.ev_label[a:b]

    def user_sessions(self, u: int) -> range:
        """Session indices of user `u`, oldest first."""
        return range(int(self.user_offsets[u]), int(self.user_offsets[u + 1]))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PreparedDataset):
            return NotImplemented
        for f in fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            if isinstance(a, np.ndarray):
                if a.dtype != b.dtype or not np.array_equal(a, b):
                    return False
            elif a != b:
                return False
        return True

    __hash__ = None  # mutable-by-content arrays; not hashable

    def save(self, path: str | Path) -> None:
        """Write the dataset to directory `path` (created if needed).

        Files: meta.json, users.json, items.json, categories.json, arrays.npz. meta.json is
        written last, so an interrupted save is refused by `load` instead of read half-way.
        """
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / "meta.json").unlink(missing_ok=True)
        for name, filename in _ID_FILES.items():
            (path / filename).write_text(json.dumps(getattr(self, name)), encoding="utf-8")
        np.savez(path / "arrays.npz", **{name: getattr(self, name) for name in _ARRAY_DTYPES})
        (path / "meta.json").write_text(json.dumps(self.meta, indent=2), encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> PreparedDataset:
        """Read a dataset written by `save`; raise `DatasetError` saying what is wrong."""
        path = Path(path)
        meta = _read_json(path / "meta.json", dict)
        if meta.get("format") != FORMAT:
            raise DatasetError(f"{path}: format is {meta.get('format')!r}, expected {FORMAT!r}")
        if meta.get("format_version") != FORMAT_VERSION:
            raise DatasetError(
                f"{path}: format_version {meta.get('format_version')!r} is not supported "
                f"(this code reads version {FORMAT_VERSION})"
            )
        ids = {name: _read_json(path / filename, list) for name, filename in _ID_FILES.items()}
        arrays = _read_arrays(path / "arrays.npz")
        dataset = cls(meta=meta, **ids, **arrays)
        _check_counts(dataset, path)
        return dataset


# --------------------------------------------------------------------------- sessionize


def sessionize(
    events: pd.DataFrame,
    *,
    gap_seconds: int = 1800,
    source: str = "csv",
    params: dict | None = None,
) -> PreparedDataset:
    """Cut a canonical event log into per-user session sequences and split it.

    Rows with a `session_id` are grouped by (user, session_id); rows without one are cut on a
    time gap: a user's events sorted by time start a new session after a gap > `gap_seconds`.
    See the module docstring for dedupe and split rules. Fully vectorised (sorts and
    bincounts); deterministic for a given log.
    """
    if gap_seconds < 0:
        raise ValueError(f"gap_seconds must be >= 0, got {gap_seconds}")
    ev = validate_events(events)
    if len(ev) == 0:
        raise ValueError("cannot sessionize an empty event log")
    n_in = len(ev)
    row = np.arange(n_in, dtype=np.int64)
    ts = ev["timestamp"].to_numpy(np.int64)
    label = ev["label"].to_numpy(np.int8)
    user_code, user_uniques = pd.factorize(ev["user_id"], sort=True)
    item_code, item_uniques = pd.factorize(ev["item_id"])

    # 1. Raw session key per event: explicit session ids (sorted codes, so ties order by id),
    #    then time-gap sessions numbered after them.
    if "session_id" in ev:
        sess_key, sid_uniques = pd.factorize(ev["session_id"], sort=True)
        sess_key = sess_key.astype(np.int64)
    else:
        sess_key, sid_uniques = np.full(n_in, -1, dtype=np.int64), []
    gap_rows = np.flatnonzero(sess_key < 0)
    if len(gap_rows):
        g = gap_rows[np.lexsort((gap_rows, ts[gap_rows], user_code[gap_rows]))]
        new = np.ones(len(g), dtype=bool)
        new[1:] = (user_code[g[1:]] != user_code[g[:-1]]) | (np.diff(ts[g]) > gap_seconds)
        sess_key[g] = len(sid_uniques) + np.cumsum(new) - 1
    n_keys = len(sid_uniques) + len(gap_rows)
    raw_uniques, raw = np.unique(user_code * np.int64(n_keys) + sess_key, return_inverse=True)

    # 2. Order sessions per user by (start, end, session key); order events by time in them.
    by_raw = np.lexsort((row, ts, raw))
    first = np.flatnonzero(np.r_[True, raw[by_raw][1:] != raw[by_raw][:-1]])
    last = np.r_[first[1:], n_in] - 1
    r_start, r_end = ts[by_raw[first]], ts[by_raw[last]]
    r_user = user_code[by_raw[first]]
    r_key = raw_uniques % n_keys
    sess_order = np.lexsort((r_key, r_end, r_start, r_user))
    sess_rank = np.empty_like(sess_order)
    sess_rank[sess_order] = np.arange(len(sess_order))
    order = np.lexsort((row, ts, sess_rank[raw]))
    e_sess, e_item, e_label = sess_rank[raw][order], item_code[order], label[order]
    s_user, s_start, s_end = r_user[sess_order], r_start[sess_order], r_end[sess_order]

    # 3. Dedupe (session, item): first position kept, positive if any occurrence is.
    pair = e_sess * np.int64(len(item_uniques)) + e_item
    _, first_idx, inverse = np.unique(pair, return_index=True, return_inverse=True)
    pos_any = np.bincount(inverse, weights=e_label, minlength=len(first_idx)) > 0
    keep = np.sort(first_idx)
    e_label = pos_any[inverse[keep]].astype(np.int8)
    e_sess, e_item = e_sess[keep], e_item[keep]

    # 4. Split and drop sessions after each user's TEST session.
    n_users = len(user_uniques)
    split = _split_sessions(s_user, e_sess, e_label, n_users)
    test_at = np.full(n_users, len(s_user), dtype=np.int64)
    test_idx = np.flatnonzero(split == Split.TEST)
    test_at[s_user[test_idx]] = test_idx
    kept_sess = np.arange(len(s_user)) <= test_at[s_user]
    new_index = np.cumsum(kept_sess) - 1
    kept_ev = kept_sess[e_sess]
    e_sess, e_item, e_label = new_index[e_sess[kept_ev]], e_item[kept_ev], e_label[kept_ev]
    s_user, s_start, s_end, split = (a[kept_sess] for a in (s_user, s_start, s_end, split))

    # 5. Vocabularies: items by first appearance, categories by first appearance over items.
    vocab_code, vocab = pd.factorize(e_item)
    item_category, category_ids = _item_categories(ev, order, item_code[order], vocab)

    n_sessions = len(s_user)
    user_offsets = np.zeros(n_users + 1, dtype=np.int64)
    np.cumsum(np.bincount(s_user, minlength=n_users), out=user_offsets[1:])
    sess_offsets = np.zeros(n_sessions + 1, dtype=np.int64)
    np.cumsum(np.bincount(e_sess, minlength=n_sessions), out=sess_offsets[1:])
    n_pos = int(e_label.sum())
    counts = {
        "n_users": n_users,
        "n_items": len(vocab),
        "n_categories": len(category_ids),
        "n_sessions": n_sessions,
        "n_events": len(e_item),
        "n_positive": n_pos,
        "n_negative": len(e_item) - n_pos,
        "n_target_sessions": int((np.bincount(e_sess, e_label, n_sessions) > 0).sum()),
        "n_val": int((split == Split.VAL).sum()),
        "n_test": int((split == Split.TEST).sum()),
        "n_input_events": n_in,
        "n_duplicate_events": n_in - len(keep),
        "n_dropped_sessions": int((~kept_sess).sum()),
    }
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "source": source,
        "params": {"gap_seconds": gap_seconds, **(params or {})},
        "counts": counts,
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    return PreparedDataset(
        meta=json.loads(json.dumps(meta, default=str)),  # JSON-native, so load() == save()
        user_ids=[str(u) for u in user_uniques],
        item_ids=[str(i) for i in item_uniques[vocab]],
        category_ids=category_ids,
        item_category=item_category,
        user_offsets=user_offsets,
        sess_user=s_user.astype(np.int32),
        sess_start=s_start.astype(np.int64),
        sess_end=s_end.astype(np.int64),
        sess_split=split.astype(np.int8),
        sess_offsets=sess_offsets,
        ev_item=(vocab_code + 1).astype(np.int32),
        ev_label=e_label,
    )


def validate_events(events: pd.DataFrame) -> pd.DataFrame:
    """Check a canonical event log and return a copy with canonical dtypes.

    Required: user_id, item_id (non-null, made str), timestamp (integer Unix seconds),
    label (0/1). Optional: session_id, category (str, null allowed). Raises ValueError.
    """
    missing = [c for c in REQUIRED_COLUMNS if c not in events.columns]
    if missing:
        raise ValueError(
            f"event log is missing required column(s) {', '.join(missing)}; expected "
            f"{', '.join(REQUIRED_COLUMNS)} (optional: {', '.join(OPTIONAL_COLUMNS)})"
        )
    out = pd.DataFrame(index=pd.RangeIndex(len(events)))
    for col in ("user_id", "item_id"):
        values = events[col].reset_index(drop=True)
        if values.isna().any():
            raise ValueError(f"column {col} has {int(values.isna().sum())} null value(s)")
        out[col] = _as_str(values)
    out["timestamp"] = _integer_column(events["timestamp"], "timestamp")
    labels = _integer_column(events["label"], "label")
    bad = ~np.isin(labels, (0, 1))
    if bad.any():
        found = sorted(set(labels[bad].tolist()))[:5]
        raise ValueError(f"column label must be 0 or 1; found {found}")
    out["label"] = labels.astype(np.int8)
    for col in OPTIONAL_COLUMNS:
        if col in events.columns:
            out[col] = _as_str(events[col].reset_index(drop=True))
    return out[[c for c in CANONICAL_ORDER if c in out.columns]]


# --------------------------------------------------------------------------- helpers


def _split_sessions(
    s_user: np.ndarray, e_sess: np.ndarray, e_label: np.ndarray, n_users: int
) -> np.ndarray:
    """Split per session (sessions grouped by user, oldest first): last target TEST, the one
    before VAL, for users with >= 3 target sessions; everything else TRAIN."""
    n_sessions = len(s_user)
    split = np.full(n_sessions, Split.TRAIN, dtype=np.int8)
    targets = np.flatnonzero(np.bincount(e_sess, weights=e_label, minlength=n_sessions) > 0)
    t_user = s_user[targets]
    n_targets = np.bincount(t_user, minlength=n_users)
    t_end = np.cumsum(n_targets)  # one past the user's last target, in `targets`
    from_end = t_end[t_user] - 1 - np.arange(len(targets))
    eligible = n_targets[t_user] >= 3
    split[targets[eligible & (from_end == 0)]] = Split.TEST
    split[targets[eligible & (from_end == 1)]] = Split.VAL
    return split


def _item_categories(
    ev: pd.DataFrame, order: np.ndarray, item_sorted: np.ndarray, vocab: np.ndarray
) -> tuple[np.ndarray, list[str]]:
    """First non-null category per vocabulary item (in sorted-log order), indexed 1..C."""
    item_category = np.zeros(len(vocab) + 1, dtype=np.int32)
    if "category" not in ev:
        return item_category, []
    cat_code, cat_uniques = pd.factorize(ev["category"])
    cat_sorted = cat_code[order]
    known = cat_sorted >= 0
    items_with, first = np.unique(item_sorted[known], return_index=True)
    cat_of_item = np.full(int(item_sorted.max()) + 1, -1, dtype=np.int64)
    cat_of_item[items_with] = cat_sorted[known][first]
    per_vocab = cat_of_item[vocab]
    has = per_vocab >= 0
    cat_index, cat_vocab = pd.factorize(per_vocab[has])
    item_category[1:][has] = cat_index + 1
    return item_category, [str(cat_uniques[c]) for c in cat_vocab]


def _as_str(values: pd.Series) -> pd.Series:
    """Ids as str, nulls kept null; integral floats (ids read next to blanks) lose the '.0'."""
    if pd.api.types.is_float_dtype(values):
        finite = values.dropna()
        if (finite == np.round(finite)).all():
            values = values.astype("Int64")
    missing = values.isna()
    return values.astype(str).where(~missing)


def _integer_column(values: pd.Series, name: str) -> np.ndarray:
    if values.isna().any():
        raise ValueError(f"column {name} has {int(values.isna().sum())} null value(s)")
    if pd.api.types.is_bool_dtype(values) or pd.api.types.is_integer_dtype(values):
        return values.to_numpy(np.int64)
    if pd.api.types.is_float_dtype(values):
        arr = values.to_numpy(np.float64)
        if not np.all(arr == np.round(arr)):
            raise ValueError(f"column {name} must hold integers; found non-integral floats")
        return arr.astype(np.int64)
    converted = pd.to_numeric(values, errors="coerce")
    if converted.isna().any():
        example = values[converted.isna()].iloc[0]
        raise ValueError(f"column {name} must hold integers; found {example!r}")
    return _integer_column(converted, name)


def _read_json(path: Path, kind: type) -> object:
    if not path.is_file():
        raise DatasetError(f"not a prepared dataset: {path} is missing")
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(value, kind):
        raise DatasetError(f"{path}: expected a JSON {kind.__name__}")
    return value


def _read_arrays(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise DatasetError(f"not a prepared dataset: {path} is missing")
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [name for name in _ARRAY_DTYPES if name not in npz.files]
            if missing:
                raise DatasetError(f"{path}: missing array(s) {', '.join(missing)}")
            return {name: npz[name] for name in _ARRAY_DTYPES}
    except DatasetError:
        raise
    except (ValueError, OSError) as exc:  # object arrays (pickle) or a corrupt archive
        raise DatasetError(f"{path}: cannot read arrays ({exc})") from exc


def _check_counts(ds: PreparedDataset, path: Path) -> None:
    counts = ds.meta.get("counts", {})
    actual = {
        "n_users": ds.n_users,
        "n_items": ds.n_items,
        "n_sessions": ds.n_sessions,
        "n_events": ds.n_events,
        "n_categories": ds.n_categories,
        "n_positive": int((ds.ev_label > 0).sum()),
        "n_negative": int((ds.ev_label == 0).sum()),
        "n_val": int((ds.sess_split == Split.VAL).sum()),
        "n_test": int((ds.sess_split == Split.TEST).sum()),
    }
    for key, value in actual.items():
        if key in counts and counts[key] != value:
            raise DatasetError(f"{path}: meta counts {key}={counts[key]} but arrays hold {value}")


def _validate(ds: PreparedDataset) -> None:
    """Raise DatasetError unless shapes, dtypes, offsets and index ranges are consistent."""
    for name, dtype in _ARRAY_DTYPES.items():
        arr = getattr(ds, name)
        if not isinstance(arr, np.ndarray) or arr.ndim != 1:
            raise DatasetError(f"{name}: expected a 1-d numpy array")
        if arr.dtype != dtype:
            raise DatasetError(f"{name}: expected dtype {np.dtype(dtype)}, got {arr.dtype}")
    for name in _ID_FILES:
        ids = getattr(ds, name)
        if not isinstance(ids, list) or not all(isinstance(x, str) for x in ids):
            raise DatasetError(f"{name}: expected a list of str")
        if len(set(ids)) != len(ids):
            raise DatasetError(f"{name}: ids are not unique")
    n_u, n_s, n_e, n_i = ds.n_users, ds.n_sessions, ds.n_events, ds.n_items
    _expect_len(ds, "item_category", n_i + 1, "n_items+1")
    _expect_len(ds, "user_offsets", n_u + 1, "n_users+1")
    for name in ("sess_start", "sess_end", "sess_split"):
        _expect_len(ds, name, n_s, "n_sessions")
    _expect_len(ds, "sess_offsets", n_s + 1, "n_sessions+1")
    _expect_len(ds, "ev_label", n_e, "n_events")
    _expect_offsets(ds.user_offsets, "user_offsets", n_s, "n_sessions")
    _expect_offsets(ds.sess_offsets, "sess_offsets", n_e, "n_events")
    owner = np.repeat(np.arange(n_u, dtype=np.int32), np.diff(ds.user_offsets))
    if not np.array_equal(ds.sess_user, owner):
        raise DatasetError("sess_user: does not match user_offsets")
    if (ds.sess_end < ds.sess_start).any():
        raise DatasetError("sess_end: a session ends before it starts")
    if not np.isin(ds.sess_split, [s.value for s in Split]).all():
        raise DatasetError("sess_split: values outside Split (0, 1, 2)")
    _expect_range(ds.ev_item, "ev_item", 1, n_i)
    _expect_range(ds.ev_label, "ev_label", 0, 1)
    _expect_range(ds.item_category, "item_category", 0, ds.n_categories)
    if ds.item_category[0] != 0:
        raise DatasetError("item_category: [0] (padding) must be 0")


def _expect_len(ds: PreparedDataset, name: str, n: int, what: str) -> None:
    got = len(getattr(ds, name))
    if got != n:
        raise DatasetError(f"{name}: expected length {what} = {n}, got {got}")


def _expect_offsets(offsets: np.ndarray, name: str, total: int, what: str) -> None:
    if offsets[0] != 0 or offsets[-1] != total:
        raise DatasetError(
            f"{name}: must run from 0 to {what} = {total}, got {offsets[0]}..{offsets[-1]}"
        )
    if (np.diff(offsets) < 0).any():
        raise DatasetError(f"{name}: must be non-decreasing")


def _expect_range(arr: np.ndarray, name: str, lo: int, hi: int) -> None:
    if len(arr) and (arr.min() < lo or arr.max() > hi):
        raise DatasetError(
            f"{name}: values must be in [{lo}, {hi}], got [{arr.min()}, {arr.max()}]"
        )
