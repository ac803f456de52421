"""The `sessionrec` command line, end to end on a tiny synthetic dataset."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from model_store.registry import Registry
from sessionrec.cli import main


def test_help_explains_every_command():
    out = subprocess.run(
        [sys.executable, "-m", "sessionrec", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for command in ("data", "train", "evaluate", "models", "demo"):
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


def test_demo_trains_both_models_indexes_the_promoted_one_and_prints_the_table(tmp_path, capsys):
    workdir = tmp_path / "demo"
    argv = ["demo", "--workdir", str(workdir), "--epochs", "1", "--users", "80", "--items", "90"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    for row in ("popularity", "recent-items", "sessionrec@", "sasrec@"):
        assert row in out
    reg = Registry(workdir / "artifacts")
    assert len(reg.versions()) == 2
    current = reg.open("current")
    assert current.kind == "sessionrec" and "item_index.faiss" in current.files
    assert json.loads((workdir / "results.json").read_text())["split"] == "test"
