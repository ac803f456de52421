"""Locust load test of the sessionrec service: a realistic mix of app-backend traffic.

Per simulated app backend (a locust "user"), weighted tasks:

* 70 — ``POST /recommend/session`` for a backfilled user, drawn Zipf-like (a few heavy users,
  a long tail), sometimes with in-session context;
* 20 — ``POST /sessions``: a session closes (a fresh session id, 3-8 items with labels);
* 10 — ``POST /recommend/session`` for a cold user (never seen: the ``cold_start`` rung).

A response counts as a failure (``catch_response``) when it is not 200, or when a
recommendation holds fewer than ``k`` items without the catalogue being exhausted, or when a
close is not acknowledged. Users and items come from files (one id per line) written by
``loadtests/run.py``; pass them with ``--users-file`` / ``--items-file`` (or the
``SESSIONREC_LOAD_USERS_FILE`` / ``SESSIONREC_LOAD_ITEMS_FILE`` environment variables).
"""

from __future__ import annotations

import itertools
import random
import time
import uuid
from pathlib import Path

from locust import FastHttpUser, between, events, task

K = 50


@events.init_command_line_parser.add_listener
def _options(parser) -> None:
    parser.add_argument(
        "--users-file", env_var="SESSIONREC_LOAD_USERS_FILE", default="", help="backfilled ids"
    )
    parser.add_argument(
        "--items-file", env_var="SESSIONREC_LOAD_ITEMS_FILE", default="", help="catalogue ids"
    )
    parser.add_argument("--zipf", type=float, env_var="SESSIONREC_LOAD_ZIPF", default=1.1)


class _Population:
    """Backfilled users with Zipf-like weights, and the item catalogue; read once."""

    users: list[str] = []
    cum_weights: list[float] = []
    items: list[str] = []

    @classmethod
    def load(cls, options) -> None:
        if cls.users:
            return
        cls.users = _read(options.users_file) or [f"u{i:05d}" for i in range(1000)]
        cls.items = _read(options.items_file) or [f"i{i:05d}" for i in range(1000)]
        weights = [1.0 / (rank + 1) ** options.zipf for rank in range(len(cls.users))]
        cls.cum_weights = list(itertools.accumulate(weights))


def _read(path: str) -> list[str]:
    if not path:
        return []
    return [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]


class AppBackend(FastHttpUser):
    wait_time = between(0.005, 0.05)

    def on_start(self) -> None:
        _Population.load(self.environment.parsed_options)
        self.rng = random.Random()

    def _user(self) -> str:
        return self.rng.choices(_Population.users, cum_weights=_Population.cum_weights)[0]

    def _recommend(self, user_id: str, name: str, **extra) -> None:
        body = {"user_id": user_id, "k": K, **extra}
        with self.client.post(
            "/recommend/session", json=body, name=name, catch_response=True
        ) as resp:
            if resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}: {resp.text[:200]}")
                return
            out = resp.json()
            if len(out["items"]) < K and not out["exhausted"]:
                resp.failure(f"{len(out['items'])} items for k={K} (source {out['source']})")
            else:
                resp.success()

    @task(70)
    def recommend_known(self) -> None:
        extra = {}
        if self.rng.random() < 0.3:  # the app already showed a few items in this session
            shown = self.rng.sample(_Population.items, 3)
            extra["context"] = {"items": [{"item_id": i, "label": 0} for i in shown]}
        self._recommend(self._user(), "recommend (known user)", **extra)

    @task(20)
    def close_session(self) -> None:
        now = int(time.time())
        items = self.rng.sample(_Population.items, self.rng.randint(3, 8))
        body = {
            "user_id": self._user(),
            "session_id": f"load-{uuid.uuid4().hex}",
            "started_at": now - self.rng.randint(60, 1800),
            "ended_at": now,
            "items": [{"item_id": i, "label": int(self.rng.random() < 0.3)} for i in items],
        }
        with self.client.post(
            "/sessions", json=body, name="close session", catch_response=True
        ) as resp:
            if resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}: {resp.text[:200]}")
            elif not resp.json()["appended"]:
                resp.failure("a fresh session id was reported as a duplicate")
            else:
                resp.success()

    @task(10)
    def recommend_cold(self) -> None:
        self._recommend(f"cold-{self.rng.randrange(10**9)}", "recommend (cold user)")
