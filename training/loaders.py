"""Raw datasets -> the canonical event log, and `prepare` (log -> sessionize -> save).

Each loader returns a DataFrame with columns user_id, session_id (optional), item_id,
timestamp (int64 Unix seconds), label (int8), category (optional) — see docs/DATA.md for the
per-dataset mapping. The choices that lose or reinterpret data:

- **Taobao**: `cart`/`fav`/`buy` are positives, `pv` is a shown-but-not-converted negative; a
  `pv` and a `buy` of one item in one session dedupe to one positive. User 100370 is dropped
  (this subset cut its log off mid-way; its last line has no timestamp) and so are the 35
  rows outside the official window 2017-11-25 .. 2017-12-03 (UTC seconds
  [1511539200, 1512316800)). No session ids: sessions come from the time gap.
- **Globo**: clicks only (all label 1); native `session_id`; milliseconds floored to seconds.
- **MIND**: one impression is one session (`session_id` = impression id) with real shown
  negatives. The `history` column has no timestamps; `history="session"` adds it as one
  positive-only pseudo-session a day before the user's first impression.

Nothing here reads pickles or downloads; real data lives in `datasets_dir()` (env
`SESSIONREC_DATASETS`, default `../shared/datasets` next to the repository).
"""

from __future__ import annotations

import enum
import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from training.dataset import (
    OPTIONAL_COLUMNS,
    REQUIRED_COLUMNS,
    PreparedDataset,
    sessionize,
    validate_events,
)

log = logging.getLogger(__name__)

DATASETS_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"

TAOBAO_BEHAVIORS = ("pv", "cart", "fav", "buy")
TAOBAO_TRUNCATED_USER = "100370"
TAOBAO_WINDOW = (1511539200, 1512316800)  # [2017-11-25, 2017-12-04) UTC
MIND_TIME_FORMAT = "%m/%d/%Y %I:%M:%S %p"
MIND_HISTORY_OFFSET_S = 86_400


class Source(enum.StrEnum):
    """Where `prepare` takes its events from."""

    SYNTHETIC = "synthetic"
    TAOBAO = "taobao"
    GLOBO = "globo"
    MIND = "mind"
    CSV = "csv"


def datasets_dir() -> Path:
    """Folder of the offline real datasets: $SESSIONREC_DATASETS, else ../shared/datasets."""
    override = os.environ.get("SESSIONREC_DATASETS")
    return Path(override) if override else DATASETS_DIR


# --------------------------------------------------------------------------- Taobao


def load_taobao(
    path: str | Path | None = None,
    *,
    positives: tuple[str, ...] = ("buy", "cart", "fav"),
    drop_users: tuple[str, ...] = (TAOBAO_TRUNCATED_USER,),
) -> pd.DataFrame:
    """Taobao UserBehavior (subset) as events: `positives` behaviours label 1, others 0.

    `path` is the CSV or its folder (default: datasets_dir()/taobao_userbehavior_subset).
    Drops `drop_users` (the subset's truncated last user), rows without a timestamp and rows
    outside the official 9-day window. `category` is the Taobao category id.
    """
    unknown = set(positives) - set(TAOBAO_BEHAVIORS)
    if unknown:
        raise ValueError(f"unknown Taobao behaviour(s) {sorted(unknown)}; use {TAOBAO_BEHAVIORS}")
    file = _resolve(path, "taobao_userbehavior_subset", "UserBehavior.csv")
    raw = pd.read_csv(
        file,
        header=None,
        names=["user_id", "item_id", "category", "behavior", "timestamp"],
        dtype={"user_id": str, "item_id": str, "category": str, "behavior": str},
    )
    keep = (
        raw["timestamp"].notna()
        & ~raw["user_id"].isin(drop_users)
        & raw["timestamp"].between(*TAOBAO_WINDOW, inclusive="left")
    )
    log.info("taobao: %d rows read, %d kept", len(raw), int(keep.sum()))
    raw = raw[keep]
    bad = ~raw["behavior"].isin(TAOBAO_BEHAVIORS)
    if bad.any():
        raise ValueError(f"{file}: unknown behaviour(s) {sorted(raw['behavior'][bad].unique())}")
    return validate_events(
        pd.DataFrame(
            {
                "user_id": raw["user_id"],
                "item_id": raw["item_id"],
                "timestamp": raw["timestamp"].astype(np.int64),
                "label": raw["behavior"].isin(positives).astype(np.int8),
                "category": raw["category"],
            }
        )
    )


# --------------------------------------------------------------------------- Globo


def load_globo(
    path: str | Path | None = None,
    *,
    max_files: int | None = None,
    max_users: int | None = None,
    seed: int = 0,
) -> pd.DataFrame:
    """Globo.com news clicks as events: native session ids, every click a positive.

    `path` is the dataset folder or its `clicks/` folder (default:
    datasets_dir()/globo_news_clicks). `max_files` reads only the first N hourly files (in
    name order); `max_users` keeps a seeded random sample of that many users.
    """
    folder = _resolve(path, "globo_news_clicks", None)
    if (folder / "clicks").is_dir():
        folder = folder / "clicks"
    files = sorted(folder.glob("clicks_hour_*.csv*"))
    if not files:
        raise FileNotFoundError(f"no clicks_hour_*.csv(.gz) files in {folder}")
    files = files[:max_files] if max_files is not None else files
    columns = ["user_id", "session_id", "click_article_id", "click_timestamp"]
    frames = [
        pd.read_csv(f, usecols=columns, dtype="int64")
        for f in tqdm(files, desc="globo files", unit="file", leave=False)
    ]
    raw = pd.concat(frames, ignore_index=True)
    if max_users is not None:
        users = np.unique(raw["user_id"].to_numpy())
        if max_users < len(users):
            chosen = np.random.default_rng(seed).choice(users, size=max_users, replace=False)
            raw = raw[raw["user_id"].isin(chosen)]
    log.info("globo: %d clicks from %d files", len(raw), len(files))
    return validate_events(
        pd.DataFrame(
            {
                "user_id": raw["user_id"].astype(str),
                "session_id": raw["session_id"].astype(str),
                "item_id": raw["click_article_id"].astype(str),
                "timestamp": raw["click_timestamp"] // 1000,
                "label": np.ones(len(raw), dtype=np.int8),
            }
        )
    )


# --------------------------------------------------------------------------- MIND


def load_mind(path: str | Path | None = None, *, history: str = "session") -> pd.DataFrame:
    """MIND(-small subset) impressions as events: one impression = one session.

    `path` is the folder holding behaviors.tsv (and news.tsv, optional; default:
    datasets_dir()/mind_small_subset). Items `N1-1` are positives, `N1-0` shown negatives;
    times are read as UTC. `history`: "session" adds each user's click history as one
    positive-only session ("hist-<user>") 1 day before their first impression; "none" drops it.
    """
    if history not in ("session", "none"):
        raise ValueError(f"history must be 'session' or 'none', got {history!r}")
    folder = _resolve(path, "mind_small_subset", None)
    behaviors = pd.read_csv(
        folder / "behaviors.tsv",
        sep="\t",
        header=None,
        names=["impression_id", "user_id", "time", "history", "impressions"],
        dtype=str,
        keep_default_na=False,
    )
    when = pd.to_datetime(behaviors["time"], format=MIND_TIME_FORMAT, utc=True)
    behaviors["timestamp"] = (when - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(seconds=1)

    shown = behaviors[["impression_id", "user_id", "timestamp", "impressions"]].assign(
        impressions=behaviors["impressions"].str.split()
    )
    shown = shown.explode("impressions", ignore_index=True).dropna(subset=["impressions"])
    pairs = shown["impressions"].str.rsplit("-", n=1, expand=True)
    if pairs.shape[1] != 2 or pairs[1].isna().any() or not pairs[1].isin(["0", "1"]).all():
        raise ValueError(f"{folder / 'behaviors.tsv'}: impressions must look like 'N123-1'")
    frames = [
        pd.DataFrame(
            {
                "user_id": shown["user_id"],
                "session_id": shown["impression_id"],
                "item_id": pairs[0],
                "timestamp": shown["timestamp"].astype(np.int64),
                "label": pairs[1].astype(np.int8),
            }
        )
    ]
    if history == "session":
        frames.append(_mind_history(behaviors))
    events = pd.concat(frames, ignore_index=True)
    news = folder / "news.tsv"
    if news.is_file():
        categories = pd.read_csv(
            news, sep="\t", header=None, usecols=[0, 1], names=["item_id", "category"], dtype=str
        ).drop_duplicates("item_id")
        events["category"] = events["item_id"].map(categories.set_index("item_id")["category"])
    return validate_events(events)


def _mind_history(behaviors: pd.DataFrame) -> pd.DataFrame:
    """Each user's click history (the same on all their rows) as one pseudo-session."""
    first = behaviors.sort_values(["timestamp", "impression_id"], kind="stable")
    first = first.drop_duplicates("user_id")
    items = first.assign(item_id=first["history"].str.split()).explode("item_id")
    items = items.dropna(subset=["item_id"])
    return pd.DataFrame(
        {
            "user_id": items["user_id"],
            "session_id": "hist-" + items["user_id"],
            "item_id": items["item_id"],
            "timestamp": items["timestamp"].astype(np.int64) - MIND_HISTORY_OFFSET_S,
            "label": np.ones(len(items), dtype=np.int8),
        }
    )


# --------------------------------------------------------------------------- CSV


def load_csv(path: str | Path, *, sep: str = ",") -> pd.DataFrame:
    """Read a canonical event CSV (header row; user_id, item_id, timestamp, label required;
    session_id, category optional) and validate it; raise ValueError naming the problem."""
    path = Path(path)
    header = pd.read_csv(path, sep=sep, nrows=0).columns
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing:
        raise ValueError(
            f"{path}: missing required column(s) {', '.join(missing)}; expected "
            f"{', '.join(REQUIRED_COLUMNS)} (optional: {', '.join(OPTIONAL_COLUMNS)}), "
            f"found {', '.join(map(str, header))}"
        )
    id_columns = {c: str for c in ("user_id", "item_id", *OPTIONAL_COLUMNS) if c in header}
    raw = pd.read_csv(path, sep=sep, dtype=id_columns)
    try:
        return validate_events(raw)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from exc


# --------------------------------------------------------------------------- prepare


def prepare(
    source: str,
    out: Path | None = None,
    *,
    gap_seconds: int = 1800,
    seed: int = 0,
    **options: object,
) -> PreparedDataset:
    """Load `source` events, sessionize them and save to `out` (when given).

    `options` go to the loader (e.g. path=..., max_users=...) or, for "synthetic", to
    `SyntheticConfig` (e.g. n_users=...). `seed` seeds the synthetic generator and Globo's user
    sample.
    """
    try:
        kind = Source(source)
    except ValueError:
        raise ValueError(
            f"unknown source {source!r}; use one of {', '.join(s.value for s in Source)}"
        ) from None
    if kind is Source.SYNTHETIC:
        from training.synthetic import SyntheticConfig, generate_events

        events = generate_events(SyntheticConfig(seed=seed, **options))
    elif kind is Source.TAOBAO:
        events = load_taobao(**options)
    elif kind is Source.GLOBO:
        events = load_globo(seed=seed, **options)
    elif kind is Source.MIND:
        events = load_mind(**options)
    else:
        if "path" not in options:
            raise ValueError("source 'csv' needs path=<file>")
        events = load_csv(**options)
    params = {"gap_seconds": gap_seconds, "seed": seed, **options}
    dataset = sessionize(events, gap_seconds=gap_seconds, source=kind.value, params=params)
    log.info("prepared %s: %s", kind.value, dataset.meta["counts"])
    if out is not None:
        dataset.save(out)
    return dataset


def _resolve(path: str | Path | None, folder: str, filename: str | None) -> Path:
    """`path` or the default dataset folder; a folder gets `filename` appended when given."""
    resolved = Path(path) if path is not None else datasets_dir() / folder
    if filename is not None and resolved.is_dir():
        resolved = resolved / filename
    if not resolved.exists():
        raise FileNotFoundError(f"dataset not found: {resolved}")
    return resolved
