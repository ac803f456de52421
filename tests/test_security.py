"""Security properties of the service (issue #7, part 3), each a real assertion:

* the admin token guards ``/admin/*`` through ``hmac.compare_digest`` (source and behaviour),
  and never reaches a log record or a response body;
* request bodies are bounded (``Content-Length`` and chunked → 413), and so are k and every
  list (422);
* user and item ids are validated (length, charset), so no id can address another user's
  Redis keys;
* nothing unpickles: no pickle/dill/joblib, no ``np.load`` / ``torch.load`` / ``yaml.load``
  without their safe flags, in any Python file of the repository;
* every file of a model artifact is checksum-verified at every load;
* every dependency is pinned with ``==``.
"""

from __future__ import annotations

import ast
import hmac
import inspect
import json
import logging
import re
import shutil
import subprocess
import textwrap
import tomllib
from pathlib import Path
from urllib.parse import quote

import pytest

import service.deps
from model_store.artifacts import ArtifactError
from model_store.registry import Registry
from model_store.store import load_model
from service.app import redis_client, state_store
from service.runner import GenerationError, load_generation
from service.schemas import MAX_CONTEXT_ITEMS, MAX_EXCLUDE, MAX_K, MAX_SESSION_ITEMS
from service.settings import Settings
from service.state import SessionRecord
from service.store import USER_ID_RE, RedisStateStore, check_user_id
from tests.servers import LiveServer, build_registry, run

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "sec-admin-token-9b2e61d4a7"
ARTIFACT_FILES = {
    "config.json",
    "model.safetensors",
    "item_vectors.safetensors",
    "id_map.json",
    "metrics.json",
    "item_index.faiss",
    "item_index.json",
}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A registry with one trained, promoted model (with its FAISS index)."""
    _, registry, versions = build_registry(tmp_path_factory.mktemp("sec"), versions=1)
    return registry, versions[0]


@pytest.fixture
def settings(world, redis_url) -> Settings:
    registry, _ = world
    return Settings(
        redis_url=redis_url,
        registry=registry.root,
        admin_token=TOKEN,
        device="cpu",
        redis_timeout_ms=2_000,
        request_timeout_ms=30_000,
    )


def session_body(user_id: str, session_id: str = "s1", items=None) -> dict:
    return {
        "user_id": user_id,
        "session_id": session_id,
        "ended_at": "2026-12-04T10:00:00Z",
        "items": items if items is not None else [{"item_id": "i00001", "label": 1}],
    }


# ----------------------------------------------------------------------------- admin token


def test_admin_token_is_compared_with_hmac_compare_digest():
    tree = ast.parse(textwrap.dedent(inspect.getsource(service.deps.require_admin)))
    calls = [
        node.func
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
    ]
    assert any(
        f.attr == "compare_digest" and isinstance(f.value, ast.Name) and f.value.id == "hmac"
        for f in calls
    ), "require_admin must compare the token with hmac.compare_digest"
    # No ==, !=, in, startswith … on the token: only `is None` checks of the setting.
    compares = [n for n in ast.walk(tree) if isinstance(n, ast.Compare)]
    assert all(isinstance(op, ast.Is | ast.IsNot) for n in compares for op in n.ops), [
        ast.unparse(n) for n in compares
    ]
    assert not {"startswith", "endswith", "find", "index"} & {f.attr for f in calls}
    assert service.deps.hmac is hmac


def test_admin_token_guard_behaviour(settings, monkeypatch):
    calls = []
    real = hmac.compare_digest

    def spy(a, b):
        calls.append((type(a), type(b)))
        return real(a, b)

    with LiveServer(settings) as server, server.client() as client:
        reload = "/admin/reload"
        bearer = {"Authorization": f"Bearer {TOKEN}"}
        assert client.post(reload).status_code == 401  # missing
        for wrong in (
            "Bearer wrong",
            f"Bearer {TOKEN}x",
            f"Bearer {TOKEN[:-1]}",
            f"Bearer {TOKEN.upper()}",
            f"Basic {TOKEN}",
            TOKEN,
            "Bearer",
        ):
            r = client.post(reload, headers={"Authorization": wrong})
            assert r.status_code == 401, (wrong, r.text)
            assert r.headers["www-authenticate"] == "Bearer"
        r = client.post(reload, headers=bearer)
        assert r.status_code == 200, r.text

        # compare_digest is what decides: spied, it is called (on bytes); forced to say
        # "different", the right token is refused.
        monkeypatch.setattr(service.deps.hmac, "compare_digest", spy)
        assert client.post(reload, headers=bearer).status_code == 200
        assert calls == [(bytes, bytes)]
        monkeypatch.setattr(service.deps.hmac, "compare_digest", lambda a, b: False)
        assert client.post(reload, headers=bearer).status_code == 401
        monkeypatch.setattr(service.deps.hmac, "compare_digest", lambda a, b: True)
        assert client.post(reload, headers={"Authorization": "Bearer x"}).status_code == 200


def test_admin_endpoints_disabled_without_a_token(settings):
    with (
        LiveServer(settings.model_copy(update={"admin_token": None})) as server,
        server.client() as client,
    ):
        r = client.post("/admin/reload")
        assert r.status_code == 403, r.text
        r = client.post("/admin/reload", headers={"Authorization": f"Bearer {TOKEN}"})
        assert r.status_code == 403, r.text


def test_admin_token_is_never_logged_nor_echoed(settings, caplog):
    caplog.set_level(logging.DEBUG)  # the root logger: everything that propagates
    assert TOKEN not in repr(settings) and TOKEN not in str(settings.model_dump())
    server = LiveServer(settings)  # uvicorn's Config configures its loggers here
    # uvicorn's loggers do not propagate to the root: capture them directly, at DEBUG.
    uvicorn_loggers = [logging.getLogger(n) for n in ("uvicorn", "uvicorn.access")]
    saved = [(lg, lg.level) for lg in uvicorn_loggers]
    for lg in uvicorn_loggers:
        lg.addHandler(caplog.handler)
        lg.setLevel(logging.DEBUG)
    bodies = []
    try:
        with server, server.client() as client:
            bearer = {"Authorization": f"Bearer {TOKEN}"}
            wrong = {"Authorization": f"Bearer {TOKEN[::-1]}"}
            as_json = {"Content-Type": "application/json"}
            sent = [
                ("POST", "/admin/reload", {"headers": bearer}),
                ("POST", "/admin/reload", {"headers": bearer, "json": {"model_ref": "latest"}}),
                ("POST", "/admin/reload", {"headers": bearer, "json": {"model_ref": "nope"}}),
                ("POST", "/admin/reload", {"headers": bearer, "json": {"model_ref": "bad ref"}}),
                ("POST", "/admin/reload", {"headers": bearer, "content": b"\xff{"}),
                ("POST", "/admin/reload", {"headers": {**bearer, **as_json}, "content": b"\xff"}),
                ("POST", "/admin/reload", {"headers": wrong}),
                ("POST", "/admin/reload", {}),
                ("GET", "/model", {"headers": bearer}),
                ("GET", "/readyz", {"headers": bearer}),
                ("GET", "/metrics", {"headers": bearer}),
                ("GET", "/openapi.json", {"headers": bearer}),
                ("POST", "/recommend/session", {"headers": bearer, "json": {"user_id": "u1"}}),
                ("POST", "/recommend/session", {"headers": bearer, "json": {"user_id": "{"}}),
            ]
            statuses = []
            for method, path, kw in sent:
                r = client.request(method, path, **kw)
                statuses.append(r.status_code)
                bodies.append(r.text + repr(dict(r.headers)))
            assert statuses[:8] == [200, 200, 422, 422, 422, 400, 401, 401], statuses
    finally:
        for lg, level in saved:
            lg.removeHandler(caplog.handler)
            lg.setLevel(level)

    # The test's own HTTP client (httpx, httpcore) logs in this process too; it is not the
    # service, so its records are left out.
    records = [r for r in caplog.records if not r.name.startswith(("httpx", "httpcore"))]
    assert any("generation" in r.getMessage() for r in records), "reload logs were not captured"
    assert any(r.name.startswith("uvicorn") for r in records), "uvicorn logs were not captured"
    formatter = logging.Formatter("%(name)s %(levelname)s %(message)s")
    for record in records:
        text = formatter.format(record) + repr(vars(record))
        assert TOKEN not in text and TOKEN[::-1] not in text, record
    for body in bodies:
        assert TOKEN not in body and TOKEN[::-1] not in body


# ----------------------------------------------------------------------------- body limits


def test_request_body_size_limit(settings):
    limit = settings.max_body_bytes

    def padded(size: int) -> bytes:
        data = json.dumps({"user_id": "u1", "k": 5}).encode()
        return data + b" " * (size - len(data))  # trailing whitespace: still valid JSON

    def chunks(data: bytes, n: int = 4096):
        for i in range(0, len(data), n):
            yield data[i : i + n]

    json_ct = {"Content-Type": "application/json"}
    with LiveServer(settings) as server, server.client() as client:
        for path in ("/recommend/session", "/sessions", "/admin/reload"):
            r = client.post(path, content=padded(limit + 1), headers=json_ct)
            assert r.status_code == 413, (path, r.text)
            assert r.json() == {"detail": f"request body larger than {limit} bytes"}
            # Chunked (no Content-Length): counted as it streams, refused past the limit.
            r = client.post(path, content=chunks(padded(4 * limit)), headers=json_ct)
            assert "content-length" not in r.request.headers
            assert r.request.headers["transfer-encoding"] == "chunked"
            assert r.status_code == 413, (path, r.text)
        # At the limit, either way, the body is read and served.
        r = client.post("/recommend/session", content=padded(limit), headers=json_ct)
        assert r.status_code == 200, r.text
        r = client.post("/recommend/session", content=chunks(padded(limit)), headers=json_ct)
        assert r.status_code == 200, r.text
        assert len(r.json()["items"]) == 5


def test_unreadable_bodies_are_refused_not_500(settings):
    """Bytes that are not UTF-8, under any content type: a 4xx that says so. (Under a non-JSON
    type FastAPI echoes the raw body in its 422, and its own encoder failed on them: a 500.)"""
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    with LiveServer(settings) as server, server.client(headers=bearer) as client:
        for path in ("/recommend/session", "/sessions", "/admin/reload"):
            for media_type in (None, "text/plain", "application/octet-stream", "application/json"):
                headers = {"Content-Type": media_type} if media_type else {}
                r = client.post(path, content=b"\x80{\xff", headers=headers)
                expected = (400, 422) if media_type == "application/json" else (422,)
                assert r.status_code in expected, (path, media_type, r.text)
                assert r.headers["content-type"] == "application/json"
        assert client.get("/healthz").status_code == 200  # the connection is still good


def test_k_and_list_lengths_are_bounded(settings):
    item = {"item_id": "i00001", "label": 0}
    too_many = [
        ("/recommend/session", {"user_id": "u1", "k": 0}, ("body", "k")),
        ("/recommend/session", {"user_id": "u1", "k": -1}, ("body", "k")),
        ("/recommend/session", {"user_id": "u1", "k": MAX_K + 1}, ("body", "k")),
        ("/recommend/session", {"user_id": "u1", "k": 10**30}, ("body", "k")),
        ("/recommend/session", {"user_id": "u1", "k": 1.5}, ("body", "k")),
        (
            "/recommend/session",
            {"user_id": "u1", "exclude": ["i1"] * (MAX_EXCLUDE + 1)},
            ("body", "exclude"),
        ),
        (
            "/recommend/session",
            {"user_id": "u1", "context": {"items": [item] * (MAX_CONTEXT_ITEMS + 1)}},
            ("body", "context", "items"),
        ),
        ("/sessions", session_body("u1", items=[]), ("body", "items")),
        (
            "/sessions",
            session_body("u1", items=[item] * (MAX_SESSION_ITEMS + 1)),
            ("body", "items"),
        ),
        # Timestamps: years 2000-2100 in UTC. The offset one is year 0 in UTC, past what
        # datetime can hold: it once escaped validation as an OverflowError, a 500 (schemathesis).
        (
            "/sessions",
            {**session_body("u1"), "ended_at": "1999-12-31T23:59:59Z"},
            ("body", "ended_at"),
        ),
        (
            "/sessions",
            {**session_body("u1"), "ended_at": "2101-01-01T00:00:00Z"},
            ("body", "ended_at"),
        ),
        (
            "/sessions",
            {**session_body("u1"), "ended_at": "0001-01-01T00:00:00+01:00"},
            ("body", "ended_at"),
        ),
        (
            "/sessions",
            {**session_body("u1"), "ended_at": "9999-12-31T23:59:59-01:00"},
            ("body", "ended_at"),
        ),
        (
            "/recommend/session",
            {"user_id": "u1", "context": {"timestamp": "0001-01-01T00:00:00+01:00"}},
            ("body", "context", "timestamp"),
        ),
    ]
    with LiveServer(settings) as server, server.client() as client:
        for path, body, loc in too_many:
            r = client.post(path, json=body)
            assert r.status_code == 422, (path, loc, r.text[:200])
            assert tuple(r.json()["detail"][0]["loc"]) == loc, r.text[:300]
        # The bounds themselves are accepted.
        r = client.post("/recommend/session", json={"user_id": "u1", "k": MAX_K})
        assert r.status_code == 200, r.text[:200]
        r = client.post(
            "/recommend/session",
            json={
                "user_id": "u1",
                "k": 1,
                "exclude": ["i1"] * MAX_EXCLUDE,
                "context": {"items": [item] * MAX_CONTEXT_ITEMS},
            },
        )
        assert r.status_code == 200, r.text[:200]
        r = client.post("/sessions", json=session_body("u1", items=[item] * MAX_SESSION_ITEMS))
        assert r.status_code == 200, r.text[:200]


# ----------------------------------------------------------------------------- ids and keys

BAD_USER_IDS = [
    "",
    "u" * 129,
    "{a}",
    "a{b",
    "a}b",
    "{",
    "}",
    "a}:{b",
    "x}:log",
    "{u1}:kv",
    "a b",
    " a",
    "a\n",
    "a\nb",
    "a\r\n",
    "a\t",
    "a\x00",
    "ü",
    "用户",
    "a\u200b",
    "a/b",
    "a*",
    "a?",
    "a[1]",
    "a,b",
    "a'",
    'a"',
    "a\\b",
    "a%7Bb",
]
BAD_ITEM_IDS = ["", "i" * 129, "a b", "a\n", "\n", "ü", "a\x00", "a\t", "a\x7f"]


def test_bad_user_ids_are_refused_everywhere(settings):
    with LiveServer(settings) as server, server.client() as client:
        for uid in BAD_USER_IDS:
            r = client.post("/recommend/session", json={"user_id": uid})
            assert r.status_code == 422, (uid, r.text)
            assert r.json()["detail"][0]["loc"] == ["body", "user_id"], (uid, r.text)
            r = client.post("/sessions", json=session_body(uid))
            assert r.status_code == 422, (uid, r.text)
            if uid and "/" not in uid:  # an empty or "/" id is another route, not this one
                r = client.delete(f"/users/{quote(uid, safe='')}")
                assert r.status_code == 422, (uid, r.status_code, r.text)
            with pytest.raises(ValueError):
                check_user_id(uid)
        r = client.delete("/users/" + "%7Ba%7D")  # percent-encoded braces arrive decoded
        assert r.status_code == 422, r.text
        assert run(_all_keys(settings.redis_url)) == []  # nothing was written for any


async def _all_keys(url: str) -> list[bytes]:
    import redis.asyncio

    client = redis.asyncio.Redis.from_url(url)
    try:
        return sorted(await client.keys("*"))
    finally:
        await client.aclose()


def test_bad_item_ids_are_refused(settings):
    with LiveServer(settings) as server, server.client() as client:
        for iid in BAD_ITEM_IDS:
            item = {"item_id": iid, "label": 1}
            bodies = [
                ("/sessions", session_body("u1", items=[item])),
                ("/recommend/session", {"user_id": "u1", "exclude": [iid]}),
                ("/recommend/session", {"user_id": "u1", "context": {"items": [item]}}),
            ]
            for path, body in bodies:
                r = client.post(path, json=body)
                assert r.status_code == 422, (iid, path, r.text)
        r = client.post("/sessions", json=session_body("u1", "s" * 129))
        assert r.status_code == 422, r.text


def test_store_keys_cannot_be_forged():
    store = RedisStateStore(_NoRedis(), max_sessions=8)
    for uid in ("a{b}", "{a}", "a}", "{", "a b", "a\n", "", "x" * 129, "ü"):
        with pytest.raises(ValueError):
            store.keys(uid)
        assert not USER_ID_RE.fullmatch(uid)
    a, ab = store.keys("a"), store.keys("a:b")
    assert set(a).isdisjoint(ab)
    tags = {_hash_tag(k) for k in a}, {_hash_tag(k) for k in ab}
    assert tags == ({"a"}, {"a:b"})  # each user's keys share one slot, and only theirs
    # Whatever valid id: its keys all carry exactly its own id as the hash tag.
    for uid in ("a", "a:b", "a:log", "a:b:kv", "sr:a", "u@x.y", "-", "A" * 128):
        assert {_hash_tag(k) for k in store.keys(uid)} == {uid}


def _hash_tag(key: str) -> str:
    """The part of a key Redis Cluster hashes: between the first '{' and the next '}'."""
    start = key.index("{")
    return key[start + 1 : key.index("}", start + 1)]


class _NoRedis:
    def register_script(self, script):
        return None


def test_colon_ids_do_not_touch_each_other(settings):
    """ "a:b" and "a" are different users in Redis: deleting one leaves the other."""
    with LiveServer(settings) as server, server.client() as client:
        for uid in ("a", "a:b", "a:b:log"):
            r = client.post("/sessions", json=session_body(uid))
            assert r.status_code == 200 and r.json()["appended"], r.text
        assert client.delete("/users/a").json() == {"user_id": "a", "deleted": True}
        for uid in ("a:b", "a:b:log"):
            r = client.post("/recommend/session", json={"user_id": uid, "k": 3})
            assert r.json()["source"] == "state", r.text
            r = client.post("/sessions", json=session_body(uid))  # same session id: duplicate
            assert r.json()["appended"] is False, r.text
        assert client.post("/recommend/session", json={"user_id": "a"}).json()["source"] == (
            "cold_start"
        )

    async def check():
        client = redis_client(settings, settings.redis_url)
        store = state_store(settings, client)
        try:
            keys = {k.decode() for k in await client.keys("*")}
            states = await store.get_many(["a", "a:b", "a:b:log"])
        finally:
            await client.aclose()
        return keys, states

    keys, states = run(check())
    store = RedisStateStore(_NoRedis(), max_sessions=settings.log_sessions)
    assert not set(store.keys("a")) & keys
    assert set(store.keys("a:b")) <= keys and set(store.keys("a:b:log")) <= keys
    assert [len(s.sessions) for s in states] == [0, 1, 1]
    assert all(isinstance(r, SessionRecord) for s in states for r in s.sessions)


# ----------------------------------------------------------------------------- no unpickling

_BANNED_MODULES = {"pick" + "le", "cPick" + "le", "_pick" + "le", "di" + "ll", "shel" + "ve"}
# `from torch import load` and the like hide the owner from the call checks below.
_UNSAFE_FROM = {
    "torch": {"load"},
    "numpy": {"load"},
    "yaml": {"load", "load_all", "unsafe_load", "full_load"},
    "jobl" + "ib": {"load"},
    "marshal": {"load", "loads"},
    "pandas": {"read_pick" + "le"},
}
_SAFE_FLAG = {
    # (module alias, function): (keyword, value it must have)
    ("np", "load"): ("allow_pickle", False),
    ("numpy", "load"): ("allow_pickle", False),
    ("torch", "load"): ("weights_only", True),
}


def unsafe_loads(source: str) -> list[str]:
    """Every unpickling construct in ``source`` (parsed, so strings and comments never count)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.split(".")[0] in _BANNED_MODULES]
        elif isinstance(node, ast.ImportFrom):
            if (node.module or "").split(".")[0] in _BANNED_MODULES:
                found.append(f"from {node.module}")
            found += [f"import {a.name}" for a in node.names if a.name in _BANNED_MODULES]
            if (node.module or "") in _UNSAFE_FROM:
                found += [
                    f"from {node.module} import {a.name}"
                    for a in node.names
                    if a.name in _UNSAFE_FROM[node.module]
                ]
        elif isinstance(node, ast.Call):
            found += _unsafe_call(node)
    return found


def _unsafe_call(node: ast.Call) -> list[str]:
    func = node.func
    text = ast.unparse(node)
    kwargs = {k.arg: k.value for k in node.keywords}
    if (isinstance(func, ast.Name) and func.id == "__import__") or (
        isinstance(func, ast.Attribute) and func.attr == "import_module"
    ):
        arg = node.args[0] if node.args else None
        if isinstance(arg, ast.Constant) and str(arg.value).split(".")[0] in _BANNED_MODULES:
            return [text]
        return []
    if not isinstance(func, ast.Attribute):
        return []
    owner = ast.unparse(func.value)
    root = owner.split(".")[0]
    if root in _BANNED_MODULES or (root == "jobl" + "ib" and func.attr.startswith("load")):
        return [text]
    if func.attr in ("read_pick" + "le", "loads") and root in ("pd", "pandas", "marshal"):
        return [text]
    if func.attr == "load" and root == "marshal":
        return [text]
    rule = _SAFE_FLAG.get((owner, func.attr))
    if rule is not None:
        name, wanted = rule
        value = kwargs.get(name)
        if not (isinstance(value, ast.Constant) and value.value is wanted):
            return [text]
    if root in ("yaml", "ruamel") and func.attr in ("load", "load_all", "unsafe_load"):
        loader = kwargs.get("Loader", node.args[1] if len(node.args) > 1 else None)
        if func.attr == "unsafe_load" or loader is None or "Safe" not in ast.unparse(loader):
            return [text]
    if func.attr == "unsafe_load":
        return [text]
    return []


def test_the_unpickling_detector_works():
    bad = [
        "import " + "pick" + "le",
        "import " + "cPick" + "le as p",
        "from " + "pick" + "le import loads",
        "import " + "di" + "ll",
        "jobl" + "ib.load('m.bin')",
        "np.load(path)",
        "np.load(path, allow_pickle=True)",
        "numpy.load(path)",
        "torch.load(f)",
        "torch.load(f, weights_only=False)",
        "torch.load(\n    f,\n    map_location='cpu',\n)",
        "yaml.load(s)",
        "yaml.load(s, Loader=yaml.Loader)",
        "yaml.unsafe_load(s)",
        "pd.read_pick" + "le(p)",
        "__import__('pick" + "le')",
        "importlib.import_module('pick" + "le')",
        "from torch import load",
        "from numpy import load as npload",
    ]
    for src in bad:
        assert unsafe_loads(src), src
    good = [
        "np.load(path, allow_pickle=False)",
        "torch.load(f, map_location='cpu', weights_only=True)",
        "yaml.load(s, Loader=yaml.SafeLoader)",
        "yaml.safe_load(s)",
        "json.load(f)",
        "x = 'import " + "pick" + "le'  # torch.load(f)",
        "safetensors.torch.load(data)",
        "from safetensors.torch import load",
        "from safetensors.numpy import load as load_numpy",
    ]
    for src in good:
        assert not unsafe_loads(src), src


def test_no_pickle_or_unsafe_loads_anywhere():
    out = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "*.py"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    files = [ROOT / f for f in out if (ROOT / f).is_file()]
    assert len(files) > 20 and Path(__file__).resolve() in files
    offenders = {}
    for path in files:
        found = unsafe_loads(path.read_text(encoding="utf-8"))
        if found:
            offenders[str(path.relative_to(ROOT))] = found
    assert not offenders, offenders
    # The text forms too (a construct ast would not see, e.g. in an exec'd string).
    text = re.compile(r"\b(import\s+c?pick" + r"le|pick" + r"le\.loads?\(|cPick" + r"le)\b")
    hits = [str(p) for p in files if text.search(p.read_text(encoding="utf-8"))]
    assert not hits, hits


# ----------------------------------------------------------------------------- artifacts


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_every_artifact_file_is_verified_at_load(world, tmp_path):
    registry, version = world
    artifact = registry.open(version)
    assert ARTIFACT_FILES <= set(artifact.files), artifact.files
    assert load_generation(registry.root, version, device="cpu").version == version
    for name in [*artifact.files, "manifest.json"]:
        root = tmp_path / name / "registry"
        shutil.copytree(registry.root, root)
        _flip(root / version / name)
        with pytest.raises(GenerationError) as err:
            load_generation(root, version, device="cpu")
        if name != "manifest.json":
            assert repr(name) in str(err.value), (name, str(err.value))
            assert "sha256 mismatch" in str(err.value), str(err.value)
        else:
            assert "manifest.json" in str(err.value), str(err.value)


def test_files_swapped_after_verification_are_refused(world, tmp_path):
    """The loaders parse the bytes they checked: a file changed between the manifest check
    and the load is refused, not loaded unverified."""
    registry, version = world
    for name in ("model.safetensors", "item_vectors.safetensors", "id_map.json"):
        root = tmp_path / name
        shutil.copytree(registry.root, root)
        artifact = Registry(root).open(version, verify=True)
        _flip(root / version / name)
        with pytest.raises(ArtifactError, match=re.escape(repr(name))):
            load_model(artifact)


# ----------------------------------------------------------------------------- pins


def test_dependencies_are_pinned():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = project["dependencies"] + project["optional-dependencies"]["dev"]
    pin = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(\[[A-Za-z0-9._,-]+\])?==[0-9][A-Za-z0-9.+!-]*$")
    loose = [d for d in deps if not pin.match(d.replace(" ", ""))]
    assert not loose, loose
    assert len(deps) >= 15
    names = [re.split(r"[\[=]", d, maxsplit=1)[0].lower().replace("_", "-") for d in deps]
    assert len(names) == len(set(names)), names
