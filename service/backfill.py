"""Backfill: load users' histories from a prepared dataset into Redis, with warm caches.

Per chunk of users: every session (the last ``log_sessions`` of each user — older ones would be
trimmed at once) is appended through the same atomic, idempotent script the service uses, in
one pipelined round trip; the logs are read back and the K/V caches built by the same
`Runner.rebuild` the service uses (a batched prefill), then written with compare-and-set. So a
backfilled user is indistinguishable from one whose sessions arrived over HTTP, and running the
backfill twice changes nothing (session ids are ``s<ordinal within the user>``).

``holdout`` keeps each user's held-out sessions out of Redis (``test``: stop before the TEST
session; ``val``: before the VAL session), which is how the service is checked against the
offline evaluation of the same users.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from tqdm.auto import tqdm

from service.runner import Generation, Runner
from service.state import SessionRecord
from service.store import RedisStateStore
from training.dataset import PreparedDataset, Split


class Holdout(enum.StrEnum):
    NONE = "none"
    VAL = "val"
    TEST = "test"


@dataclass(frozen=True)
class BackfillReport:
    users: int
    sessions: int  # appended now (duplicates of an earlier run are not counted)
    duplicates: int
    caches: int  # K/V caches written
    superseded: int  # cache writes refused because a live close moved the log on meanwhile


def user_sessions(
    ds: PreparedDataset, user: int, holdout: Holdout, limit: int
) -> list[SessionRecord]:
    """One user's sessions as log records, oldest first, the last ``limit`` of them."""
    sessions = list(ds.user_sessions(user))
    if holdout is not Holdout.NONE:
        split = Split.TEST if holdout is Holdout.TEST else Split.VAL
        held = [i for i, s in enumerate(sessions) if ds.sess_split[s] == split]
        if held:
            sessions = sessions[: held[0]]
    first = int(ds.user_offsets[user])
    out = []
    for s in sessions[-limit:]:
        items, labels = ds.session(s)
        out.append(
            SessionRecord(
                session_id=f"s{s - first}",
                started_at=int(ds.sess_start[s]),
                ended_at=int(ds.sess_end[s]),
                items=tuple(ds.item_ids[i - 1] for i in items),
                labels=tuple(int(x) for x in labels),
            )
        )
    return out


async def backfill(
    ds: PreparedDataset,
    store: RedisStateStore,
    generation: Generation,
    users: Sequence[int] | None = None,
    *,
    holdout: Holdout = Holdout.NONE,
    chunk: int = 256,
    progress: bool = True,
) -> BackfillReport:
    """Load ``users`` (dataset indices; default all) into the store; see the module doc."""
    users = np.arange(ds.n_users) if users is None else np.asarray(users)
    runner = Runner(max_batch=chunk)
    compute = ThreadPoolExecutor(1, thread_name_prefix="sessionrec-backfill")
    loop = asyncio.get_running_loop()
    await store.load_scripts()
    appended = duplicates = caches = superseded = 0
    bar = tqdm(total=len(users), desc="backfill", unit="user", disable=not progress)
    try:
        for start in range(0, len(users), chunk):
            part = users[start : start + chunk]
            pairs = [
                (ds.user_ids[u], record)
                for u in part
                for record in user_sessions(ds, int(u), holdout, store.max_sessions)
            ]
            results = await store.append_many(pairs) if pairs else []
            appended += sum(r.appended for r in results)
            duplicates += sum(not r.appended for r in results)
            ids = [ds.user_ids[u] for u in part]
            states = [s for s in await store.get_many(ids, last=generation.history + 1) if s.seq]
            kvs = await loop.run_in_executor(
                compute,
                runner.rebuild,
                generation,
                [s.sessions for s in states],
                [s.seq for s in states],
            )
            ok = await store.put_kv_many(
                [(s.user_id, kv) for s, kv in zip(states, kvs, strict=True)]
            )
            caches += sum(ok)
            superseded += len(ok) - sum(ok)
            bar.update(len(part))
            bar.set_postfix(sessions=appended, caches=caches)
    finally:
        bar.close()
        compute.shutdown(wait=True)
    return BackfillReport(len(users), appended, duplicates, caches, superseded)
