"""Schemathesis against the live service's own ``/openapi.json`` (issue #7, part 2).

The real app under uvicorn (`LiveServer`), a real redis-server (the ``redis_url`` fixture) and
a tiny trained registry. Every operation of the OpenAPI document gets Hypothesis-generated
cases (schemathesis' ``APIOperation.as_strategy``), schema-valid (positive) and
schema-violating (negative), sent over HTTP and checked with ``Case.call_and_validate``:

* ``not_a_server_error``: no 5xx, ever;
* ``status_code_conformance``: the status is one the operation documents;
* ``content_type_conformance``: the Content-Type is the documented one;
* ``response_schema_conformance``: the body validates against the documented schema.

No check is excluded. On top of the generated cases:

* ``/admin/reload`` is sent twice per case: as generated (no token or a random one → 401)
  and with the admin token (→ 200, or 422 for an unknown model reference; never 5xx);
* a *raw* variant sends arbitrary bytes under JSON and non-JSON content types to every
  operation with a body (FastAPI echoes a non-JSON body into its 422, which failed with a 500
  on bytes that are not UTF-8 until `service.app.validation_error`);
* a *pooled* variant of the body operations maps user ids onto three users and item ids onto
  the catalogue, so sessions really append and recommendations come from cached state, not
  only cold starts of never-seen users;
* explicit boundary cases (oversized bodies → 413, k and id bounds → 422, a real reload)
  go through the same checks, so every status the service answers is one it documents.

The cases run, per operation and variant, are counted and printed (``pytest -s``); the test
asserts at least ``MIN_CASES`` Hypothesis-generated ones.
"""

from __future__ import annotations

import time
import zlib
from collections import Counter, defaultdict
from datetime import datetime
from pathlib import Path

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given
from hypothesis import settings as hyp_settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from service.schemas import MAX_K
from service.settings import Settings
from tests.servers import LiveServer, build_registry

TOKEN = "fuzz-admin-token-4c1f0e7d"
MIN_CASES = 1000
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]
POSITIVE, NEGATIVE = GenerationMode.POSITIVE, GenerationMode.NEGATIVE
POOL = ("pool-a", "pool-b", "pool:c")
# Bodies the schema does not describe: arbitrary bytes under these content types.
RAW_MEDIA_TYPES = (
    "application/json",
    "text/plain",
    "application/octet-stream",
    "application/x-www-form-urlencoded",
    "application/xml",
)
# Hypothesis max_examples per (operation, variant). The GET operations have no inputs: their
# search space is one case (Hypothesis stops there), and there is no negative case to make.
PLAN: list[tuple[str, str, int]] = [
    ("POST /sessions", "pooled", 160),  # first: the pooled users then have state to serve
    ("POST /sessions", "positive", 150),
    ("POST /sessions", "negative", 150),
    ("POST /recommend/session", "pooled", 120),
    ("POST /recommend/session", "positive", 220),
    ("POST /recommend/session", "negative", 150),
    ("DELETE /users/{user_id}", "positive", 100),
    ("DELETE /users/{user_id}", "negative", 80),
    ("POST /admin/reload", "positive", 80),  # each case sent twice: without, with the token
    ("POST /admin/reload", "negative", 80),
    ("POST /sessions", "raw", 50),
    ("POST /recommend/session", "raw", 50),
    ("POST /admin/reload", "raw", 40),
    ("GET /healthz", "positive", 5),
    ("GET /readyz", "positive", 5),
    ("GET /metrics", "positive", 5),
    ("GET /model", "positive", 5),
]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> tuple[Path, list[str]]:
    """A registry with one trained, promoted model, and that model's item ids."""
    _, registry, _ = build_registry(tmp_path_factory.mktemp("fuzz"), versions=1)
    catalogue = registry.open("current").read_json("id_map.json")["items"]
    return registry.root, [str(item) for item in catalogue]


def _hypothesis(n: int):
    return hyp_settings(
        max_examples=n,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
        phases=[Phase.explicit, Phase.generate, Phase.shrink],
    )


class Fuzzer:
    """Sends cases, validates every response, counts them per operation and variant."""

    def __init__(self, session: requests.Session, catalogue: list[str]) -> None:
        self.session = session
        self.catalogue = catalogue
        self.cases: Counter[str] = Counter()
        self.statuses: dict[str, Counter[int]] = defaultdict(Counter)
        self.sources: Counter[str] = Counter()

    def send(self, case, key: str, *, token: bool = False):
        headers = {"Authorization": f"Bearer {TOKEN}"} if token else None
        response = case.call_and_validate(session=self.session, headers=headers, checks=CHECKS)
        self.cases[key] += 1
        self.statuses[key][response.status_code] += 1
        if response.status_code == 200 and case.path == "/recommend/session":
            self.sources[response.json()["source"]] += 1
        return response

    def run(self, op, variant: str, n: int) -> None:
        key = f"{op.label} [{variant}]"
        mode = NEGATIVE if variant == "negative" else POSITIVE
        if variant == "raw":
            strategy = st.builds(
                lambda media_type, body: op.Case(media_type=media_type, body=body),
                st.sampled_from(RAW_MEDIA_TYPES),
                st.binary(max_size=256) | st.text(max_size=64).map(str.encode),
            )
        else:
            strategy = op.as_strategy(generation_mode=mode)
        if variant == "pooled":
            strategy = strategy.map(self.pooled)
        admin = op.path.startswith("/admin/")

        @_hypothesis(n)
        @given(case=strategy)
        def fuzz(case):
            response = self.send(case, key)
            if admin:
                check_admin(response, authorised=False)
                response = self.send(case, f"{key} +token", token=True)
                check_admin(response, authorised=True)

        fuzz()

    def pooled(self, case):
        """A valid body whose user is one of `POOL` and whose items are catalogue items, with
        timestamps moved into the accepted years (2000-2099) and started_at ≤ ended_at."""
        body = case.body
        if not isinstance(body, dict):
            return case
        body["user_id"] = POOL[zlib.crc32(body["user_id"].encode()) % len(POOL)]
        for entry in [*body.get("items", ()), *(body.get("context") or {}).get("items", ())]:
            entry["item_id"] = self.known(entry["item_id"])
        if "exclude" in body:
            body["exclude"] = [self.known(i) for i in body["exclude"]]
        stamps = [body, body.get("context") or {}]
        for holder in stamps:
            for field in ("started_at", "ended_at", "timestamp"):
                if isinstance(holder.get(field), str):
                    holder[field] = "20" + holder[field][2:]
        try:
            if datetime.fromisoformat(body["started_at"]) > datetime.fromisoformat(
                body["ended_at"]
            ):
                body["started_at"], body["ended_at"] = body["ended_at"], body["started_at"]
        except (KeyError, TypeError, ValueError):
            pass
        return case

    def known(self, item: str) -> str:
        return self.catalogue[zlib.crc32(item.encode()) % len(self.catalogue)]


def check_admin(response, *, authorised: bool) -> None:
    """With the right token: 200 or a 4xx refusal. Without it: 401, unless the body was
    unreadable — FastAPI reads the body before any dependency, so 400 (not UTF-8) or 422
    ``json_invalid`` come first; neither reveals or does anything."""
    sent = response.request.headers.get("Authorization")
    assert authorised == (sent == f"Bearer {TOKEN}") or sent is None, sent
    code = response.status_code
    body = response.json()
    if sent == f"Bearer {TOKEN}":
        assert code in (200, 400, 422), response.text
    elif code != 401:
        detail = body["detail"]
        unreadable = code == 400 or (
            code == 422 and all(e["type"] == "json_invalid" for e in detail)
        )
        assert unreadable, (sent, response.text)
    assert TOKEN not in response.text


def test_schemathesis_fuzz_live_service(world, redis_url):
    registry_root, catalogue = world
    settings = Settings(
        redis_url=redis_url,
        registry=registry_root,
        admin_token=TOKEN,
        device="cpu",
        redis_timeout_ms=2_000,  # busy shared cores: no `degraded` from a slow PING
        request_timeout_ms=30_000,  # … and no 503 from a slow queue: this test wants zero 5xx
    )
    started = time.monotonic()
    with LiveServer(settings) as server, requests.Session() as session:
        schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
        ops = {result.ok().label: result.ok() for result in schema.get_all_operations()}
        assert set(ops) == {label for label, _, _ in PLAN}, sorted(ops)
        fuzzer = Fuzzer(session, catalogue)
        for label, variant, n in PLAN:
            fuzzer.run(ops[label], variant, n)

        # Explicit boundary cases through the same checks.
        big = {"user_id": "u1", "k": 1, "exclude": ["x" * 100] * 3000}  # ≈ 310 kB > 256 KiB
        boundary = [
            ("POST /recommend/session", {"body": big}, 413),
            ("POST /sessions", {"body": big}, 413),
            ("POST /admin/reload", {"body": big}, 413),
            ("POST /recommend/session", {"body": {"user_id": "u1", "k": 0}}, 422),
            ("POST /recommend/session", {"body": {"user_id": "u1", "k": MAX_K + 1}}, 422),
            ("POST /recommend/session", {"body": {"user_id": "u" * 129}}, 422),
            ("POST /recommend/session", {"body": {"user_id": "u1", "k": MAX_K}}, 200),
            ("DELETE /users/{user_id}", {"path_parameters": {"user_id": "u" * 129}}, 422),
            ("DELETE /users/{user_id}", {"path_parameters": {"user_id": "a{b}"}}, 422),
            ("POST /admin/reload", {"body": {"model_ref": "no-such-version"}}, 422),
            ("POST /admin/reload", {"body": {"model_ref": "current"}}, 200),
        ]
        for label, kw, expected in boundary:
            case = ops[label].Case(media_type="application/json", **kw)
            token = label.startswith("POST /admin/")
            response = fuzzer.send(case, f"{label} [boundary]", token=token)
            assert response.status_code == expected, (label, response.text[:300])
    elapsed = time.monotonic() - started

    cases, statuses = fuzzer.cases, fuzzer.statuses
    total = sum(cases.values())
    # Hypothesis-generated cases; the rest are the admin cases re-sent with the token and the
    # explicit boundary cases.
    generated = sum(n for key, n in cases.items() if "+token" not in key and "boundary" not in key)
    width = max(map(len, cases))
    print(
        f"\nschemathesis {schemathesis.__version__}: {generated} generated cases, {total} "
        f"requests validated, in {elapsed:.1f} s"
    )
    for key in sorted(cases):
        codes = ", ".join(f"{c}×{n}" for c, n in sorted(statuses[key].items()))
        print(f"  {key:<{width}}  {cases[key]:>4}  ({codes})")
    print(f"  recommendation sources: {dict(fuzzer.sources)}")
    assert all(code < 500 for counter in statuses.values() for code in counter), statuses
    assert generated >= MIN_CASES, cases
    # The pooled users had sessions: their recommendations came from cached state too.
    assert fuzzer.sources["state"] + fuzzer.sources["rebuilt"] > 0, fuzzer.sources
    # Both sides of the admin guard were exercised.
    assert statuses["POST /admin/reload [positive]"][401] > 0, statuses
    assert statuses["POST /admin/reload [positive] +token"][200] > 0, statuses
    assert statuses["POST /admin/reload [positive] +token"][422] > 0, statuses
