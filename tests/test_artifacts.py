"""Artifact directories: round trip, manifest checksums, corruption detection, atomicity."""

from __future__ import annotations

import hashlib
import json
from datetime import datetime
from pathlib import Path

import pytest

from model_store.artifacts import (
    FORMAT,
    MANIFEST,
    ArtifactError,
    ArtifactWriter,
    add_files,
    open_artifact,
    sha256_file,
)

WEIGHTS = bytes(range(256)) * 5000  # > 1 MiB, so hashing takes more than one chunk
CONFIG = {"d_model": 64, "n_layers": 2, "name": "tiny"}


def _write(target: Path, *, version: str = "v1") -> Path:
    with ArtifactWriter(target, version=version, kind="sessionrec", extra={"seed": 7}) as w:
        w.write_json("config.json", CONFIG)
        w.write_bytes("weights.safetensors", WEIGHTS)
        w.path("index/ids.txt").write_text("a\nb\n")
    return target


def _hidden(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.startswith(".")]


@pytest.fixture
def artifact(tmp_path: Path) -> Path:
    return _write(tmp_path / "v1")


def test_round_trip(artifact: Path) -> None:
    a = open_artifact(artifact)
    assert a.root == artifact
    assert (a.version, a.kind) == ("v1", "sessionrec")
    assert a.extra == {"seed": 7}
    assert a.files == ["config.json", "index/ids.txt", "weights.safetensors"]
    assert a.read_json("config.json") == CONFIG
    assert a.read_bytes("weights.safetensors") == WEIGHTS
    assert a.path("index/ids.txt").read_text() == "a\nb\n"
    assert _hidden(artifact.parent) == []


def test_manifest_lists_exact_hashes_and_sizes(artifact: Path) -> None:
    manifest = json.loads((artifact / MANIFEST).read_text())
    assert manifest["format"] == FORMAT
    assert manifest["format_version"] == 1
    assert datetime.fromisoformat(manifest["created_at"]).utcoffset().total_seconds() == 0
    assert set(manifest["files"]) == {"config.json", "weights.safetensors", "index/ids.txt"}
    for name, entry in manifest["files"].items():
        data = (artifact / name).read_bytes()
        assert entry == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    assert sha256_file(artifact / "weights.safetensors") == hashlib.sha256(WEIGHTS).hexdigest()


def test_json_is_sorted_and_indented(artifact: Path) -> None:
    text = (artifact / "config.json").read_text(encoding="utf-8")
    assert text == json.dumps(CONFIG, sort_keys=True, indent=2) + "\n"


def test_unlisted_name_refused(artifact: Path) -> None:
    with pytest.raises(ArtifactError, match="'metrics.json' is not listed"):
        open_artifact(artifact).path("metrics.json")
    with pytest.raises(ArtifactError, match="lacks required files: metrics.json"):
        open_artifact(artifact, require=("config.json", "metrics.json"))


def test_flipped_byte_detected(artifact: Path) -> None:
    path = artifact / "weights.safetensors"
    data = bytearray(path.read_bytes())
    data[123_456] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"'weights.safetensors'.*sha256 mismatch, expected"):
        open_artifact(artifact)
    open_artifact(artifact, verify=False)  # structure alone is still fine


def test_truncated_file_detected(artifact: Path) -> None:
    path = artifact / "weights.safetensors"
    path.write_bytes(WEIGHTS[:-1])
    with pytest.raises(
        ArtifactError,
        match=rf"'weights.safetensors'.*expected {len(WEIGHTS)} bytes, found {len(WEIGHTS) - 1}",
    ):
        open_artifact(artifact)


def test_missing_file_detected(artifact: Path) -> None:
    (artifact / "index" / "ids.txt").unlink()
    with pytest.raises(ArtifactError, match="'index/ids.txt' listed in the manifest is missing"):
        open_artifact(artifact)


def test_bad_manifest_json(artifact: Path) -> None:
    (artifact / MANIFEST).write_text('{"format": ')
    with pytest.raises(ArtifactError, match="manifest.json .* is not valid JSON"):
        open_artifact(artifact)


def test_missing_manifest(tmp_path: Path) -> None:
    (tmp_path / "v1").mkdir()
    with pytest.raises(ArtifactError, match="no manifest.json in"):
        open_artifact(tmp_path / "v1")


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("format_version", 2, "unsupported format_version 2"),
        ("format", "something-else", "format is 'something-else'"),
        ("files", [], "'files' must be an object"),
        ("files", {"x": {"sha256": "zz", "bytes": 1}}, "entry for file 'x'"),
        ("files", {"../x": {"sha256": "0" * 64, "bytes": 1}}, "invalid artifact file name"),
    ],
)
def test_bad_manifest_fields(artifact: Path, key: str, value: object, message: str) -> None:
    manifest = json.loads((artifact / MANIFEST).read_text())
    manifest[key] = value
    (artifact / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=message):
        open_artifact(artifact, verify=False)


@pytest.mark.parametrize(
    "name", ["../x", "/abs", "manifest.json", "a/../b", "", "a//b", ".hidden", "a\\b", "sp ace"]
)
def test_name_validation(tmp_path: Path, name: str) -> None:
    w = ArtifactWriter(tmp_path / "v1", version="v1", kind="sessionrec")
    with pytest.raises(ArtifactError, match="invalid artifact file name"):
        w.path(name)
    w.abort()


@pytest.mark.parametrize("version", ["", "../x", "a/b", ".tmp", "x y"])
def test_version_validation(tmp_path: Path, version: str) -> None:
    with pytest.raises(ArtifactError, match="invalid version name"):
        ArtifactWriter(tmp_path / "v", version=version, kind="sessionrec")


def test_exception_leaves_nothing_visible(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="boom"):
        with ArtifactWriter(tmp_path / "v1", version="v1", kind="sessionrec") as w:
            w.write_bytes("weights.safetensors", WEIGHTS)
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_nothing_visible_before_commit(tmp_path: Path) -> None:
    w = ArtifactWriter(tmp_path / "v1", version="v1", kind="sessionrec")
    w.write_json("config.json", CONFIG)
    assert not (tmp_path / "v1").exists()
    assert all(name.startswith(".tmp-v1-") for name in _hidden(tmp_path))
    w.commit()
    assert _hidden(tmp_path) == []
    with pytest.raises(ArtifactError, match="already committed or aborted"):
        w.write_json("late.json", {})


def test_reserved_but_unwritten_file_refused(tmp_path: Path) -> None:
    w = ArtifactWriter(tmp_path / "v1", version="v1", kind="sessionrec")
    w.path("weights.safetensors")
    with pytest.raises(ArtifactError, match="never written.*weights.safetensors"):
        w.commit()
    assert list(tmp_path.iterdir()) == []


def test_existing_target_refused(artifact: Path) -> None:
    with pytest.raises(ArtifactError, match="already exists"):
        ArtifactWriter(artifact, version="v1", kind="sessionrec")


def test_target_created_during_write_refused(tmp_path: Path) -> None:
    w = ArtifactWriter(tmp_path / "v1", version="v1", kind="sessionrec")
    w.write_json("config.json", CONFIG)
    _write(tmp_path / "v1")  # someone else publishes the same version first
    with pytest.raises(ArtifactError, match="refusing to commit.*already exists"):
        w.commit()
    assert open_artifact(tmp_path / "v1").read_bytes("weights.safetensors") == WEIGHTS
    assert _hidden(tmp_path) == []


def test_add_files(artifact: Path, tmp_path: Path) -> None:
    before = {p: p.read_bytes() for p in artifact.rglob("*") if p.is_file() and p.name != MANIFEST}
    index = tmp_path / "built.faiss"
    index.write_bytes(b"faiss-bytes" * 1000)
    add_files(artifact, {"index/items.faiss": index})

    a = open_artifact(artifact)
    assert "index/items.faiss" in a.files
    assert a.read_bytes("index/items.faiss") == b"faiss-bytes" * 1000
    assert index.exists()  # copied, not moved
    assert {p: p.read_bytes() for p in before} == before
    assert a.manifest["files"]["index/items.faiss"]["bytes"] == 11_000
    assert _hidden(artifact) == [] and _hidden(artifact / "index") == []


def test_add_files_move(artifact: Path, tmp_path: Path) -> None:
    src = tmp_path / "metrics.json"
    src.write_text('{"recall@50": 0.1}')
    add_files(artifact, {"metrics.json": src}, move=True)
    assert not src.exists()
    assert open_artifact(artifact).read_json("metrics.json") == {"recall@50": 0.1}


def test_add_files_refuses_listed_names(artifact: Path, tmp_path: Path) -> None:
    src = tmp_path / "other.json"
    src.write_text("{}")
    manifest_before = (artifact / MANIFEST).read_bytes()
    with pytest.raises(ArtifactError, match="already listed.*config.json"):
        add_files(artifact, {"config.json": src})
    with pytest.raises(ArtifactError, match="invalid artifact file name"):
        add_files(artifact, {"../escape.json": src})
    with pytest.raises(ArtifactError, match="is not a regular file"):
        add_files(artifact, {"x.json": tmp_path / "nope"})
    assert (artifact / MANIFEST).read_bytes() == manifest_before


def test_add_files_after_interrupted_add(artifact: Path, tmp_path: Path) -> None:
    # A crash after the data rename but before the manifest swap leaves an unlisted file.
    (artifact / "metrics.json").write_text("partial")
    assert "metrics.json" not in open_artifact(artifact).files
    src = tmp_path / "metrics.json"
    src.write_text('{"ok": true}')
    add_files(artifact, {"metrics.json": src})
    assert open_artifact(artifact).read_json("metrics.json") == {"ok": True}


def test_read_bytes_refuses_a_file_changed_after_verification(tmp_path):
    with ArtifactWriter(tmp_path / "v1", version="v1", kind="test") as w:
        w.write_bytes("weights.bin", b"original")
    artifact = open_artifact(tmp_path / "v1")  # verified now
    (tmp_path / "v1" / "weights.bin").write_bytes(b"swapped!")  # same size, different bytes
    with pytest.raises(ArtifactError, match="weights.bin.*sha256 mismatch"):
        artifact.read_bytes("weights.bin")
