"""The `sessionrec` command line, end to end on a tiny synthetic dataset."""

from __future__ import annotations

import json
import queue
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from model_store.registry import Registry
from sessionrec.cli import main
from tests.servers import free_port, wait_until


def test_help_explains_every_command():
    out = subprocess.run(
        [sys.executable, "-m", "sessionrec", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for command in ("data", "train", "evaluate", "models", "index", "backfill", "serve", "demo"):
        assert command in out
    train_help = subprocess.run(
        [sys.executable, "-m", "sessionrec", "train", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "--rank-alpha" in train_help and "--window" in train_help


def prepare_synthetic(data, *, users: int, items: int) -> int:
    argv = ["data", "prepare", "--source", "synthetic", "--out", str(data)]
    return main([*argv, "--users", str(users), "--items", str(items)])


def test_prepare_train_evaluate_promote(tmp_path, capsys):
    data, registry = tmp_path / "data", tmp_path / "artifacts"
    assert prepare_synthetic(data, users=120, items=150) == 0
    counts = json.loads(capsys.readouterr().out)
    assert counts["n_users"] == 120 and counts["n_test"] > 0

    tiny = [
        "--dim",
        "16",
        "--layers",
        "1",
        "--epochs",
        "1",
        "--negatives",
        "64",
        "--device",
        "cpu",
        "--data",
        str(data),
        "--registry",
        str(registry),
    ]
    assert main(["train", "--promote", *tiny]) == 0
    assert "promoted to CURRENT" in capsys.readouterr().out
    assert main(["train", "--model", "sasrec", *tiny]) == 0
    capsys.readouterr()
    reg = Registry(registry)
    sessionrec, sasrec = reg.versions()
    assert reg.current() == sessionrec

    out = tmp_path / "results.json"
    assert (
        main(
            [
                "evaluate",
                "--data",
                str(data),
                "--registry",
                str(registry),
                "--model",
                "current",
                "--model",
                sasrec,
                "--out",
                str(out),
            ]
        )
        == 0
    )
    table = capsys.readouterr().out
    assert "popularity" in table and sessionrec in table and sasrec in table
    rows = json.loads(out.read_text())["rows"]
    assert set(rows) == {
        "popularity",
        "recent-items",
        f"sessionrec@{sessionrec}",
        f"sasrec@{sasrec}",
    }

    assert main(["index", "build", "--registry", str(registry), "--kind", "ivf"]) == 0
    out_text = capsys.readouterr().out
    assert f"{sessionrec}: ivf index over 150 items" in out_text and "recall@100" in out_text
    assert "item_index.faiss" in reg.open("current").files
    # A published version's index never changes: a second build is refused with a message.
    assert main(["index", "build", "--registry", str(registry)]) == 1
    assert "already listed" in capsys.readouterr().err

    assert main(["models", "promote", "sasrec", "--registry", str(registry)]) == 0
    assert reg.current() == sasrec
    assert main(["models", "list", "--registry", str(registry)]) == 0
    assert f"* {sasrec}" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["evaluate", "--data", "/nonexistent/data"], "nonexistent"),
        (["data", "prepare", "--source", "csv", "--out", "/tmp/x"], "path"),
    ],
)
def test_user_errors_exit_1_with_a_message(argv, message, capsys):
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("sessionrec: error:") and message in err


def test_evaluate_without_a_current_model_says_how_to_get_one(tmp_path, capsys):
    data = tmp_path / "data"
    prepare_synthetic(data, users=60, items=80)
    capsys.readouterr()
    assert main(["evaluate", "--data", str(data), "--registry", str(tmp_path / "empty")]) == 1
    assert "current" in capsys.readouterr().err


def test_demo_trains_indexes_backfills_and_serves_the_printed_curl(tmp_path):
    """`sessionrec demo` as a user runs it: a real process that ends up serving HTTP."""
    workdir, port = tmp_path / "demo", free_port()
    argv = ["demo", "--workdir", str(workdir), "--epochs", "1", "--users", "80", "--items", "90"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "sessionrec", *argv, "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout], daemon=True).start()
    out, curl = [], None
    deadline = time.monotonic() + 240
    try:
        while curl is None:
            try:
                line = lines.get(timeout=max(deadline - time.monotonic(), 0.01))
            except queue.Empty:
                pytest.fail("demo printed no curl within 240 s:\n" + "".join(out))
            out.append(line)
            if line.strip().startswith("curl "):
                curl = line
        text = "".join(out)
        for row in ("popularity", "recent-items", "sessionrec@", "sasrec@", "backfilled 80 users"):
            assert row in text
        body = json.loads(curl.split("-d '", 1)[1].rsplit("'", 1)[0])
        url = curl.split()[4]
        assert url == f"http://127.0.0.1:{port}/recommend/session"
        with httpx.Client(timeout=10) as client:
            wait_until(lambda: _ready(client, port), 60, "the demo service to be ready")
            r = client.post(url, json=body)
        assert r.status_code == 200 and r.json()["source"] == "state"
        assert len(r.json()["items"]) == body["k"]
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
    current = Registry(workdir / "artifacts").open("current")
    assert current.kind == "sessionrec" and "item_index.faiss" in current.files


def _ready(client, port) -> bool:
    try:
        return client.get(f"http://127.0.0.1:{port}/readyz").status_code == 200
    except httpx.TransportError:
        return False


def test_backfill_loads_users_once_and_serve_explains_itself(tmp_path, redis_url, capsys):
    data, registry = tmp_path / "data", tmp_path / "artifacts"
    assert prepare_synthetic(data, users=60, items=80) == 0
    train = ["train", "--data", str(data), "--registry", str(registry), "--promote"]
    assert main([*train, "--epochs", "1", "--dim", "16", "--window", "4"]) == 0
    assert main(["index", "build", "--registry", str(registry)]) == 0
    capsys.readouterr()
    argv = ["backfill", "--data", str(data), "--registry", str(registry), "--redis-url", redis_url]
    assert main([*argv, "--users", "25"]) == 0
    assert "users: 25" in capsys.readouterr().out
    assert main([*argv, "--users", "25"]) == 0
    again = capsys.readouterr().out
    assert "sessions appended: 0" in again and "caches written: 25" in again
    serve_help = subprocess.run(
        [sys.executable, "-m", "sessionrec", "serve", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for flag in ("--host", "--port", "--redis-url", "--registry", "SESSIONREC_"):
        assert flag in serve_help


def test_serve_and_backfill_take_the_redis_url_from_the_environment(monkeypatch, tmp_path):
    from sessionrec.cli import _settings

    monkeypatch.setenv("SESSIONREC_REDIS_URL", "redis://127.0.0.1:6390/0")
    monkeypatch.setenv("SESSIONREC_ADMIN_TOKEN", "")
    settings = _settings(registry=tmp_path, model_ref=None, redis_url=None, data_dir=None)
    assert settings.redis_url == "redis://127.0.0.1:6390/0" and settings.registry == tmp_path
    assert settings.admin_token is None  # set but empty = admin disabled
    assert _settings(redis_url="redis://other:1/0").redis_url == "redis://other:1/0"
    assert _settings(embedded=True).redis_url is None  # the demo's own Redis
