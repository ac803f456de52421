"""The version registry: naming, listing, promotion and reference resolution."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from model_store.artifacts import MANIFEST, ArtifactWriter
from model_store.registry import CURRENT_FILE, Registry, RegistryError


def _commit(reg: Registry, version: str, kind: str = "sessionrec") -> str:
    with reg.writer(version, kind=kind, extra={"note": version}) as w:
        w.write_json("config.json", {"version": version})
        w.write_bytes("weights.safetensors", version.encode() * 100)
    return version


@pytest.fixture
def reg(tmp_path: Path) -> Registry:
    return Registry(tmp_path / "registry")


def test_new_version_unique_and_sortable(tmp_path: Path) -> None:
    start = datetime(2024, 12, 31, 23, 59, 58, tzinfo=UTC)
    ticks = iter(start + timedelta(milliseconds=250 * i) for i in range(400))
    reg = Registry(tmp_path, clock=lambda: next(ticks))
    names = [reg.new_version("sessionrec") for _ in range(400)]
    assert len(set(names)) == len(names)
    assert names[0].startswith("sessionrec-20241231T235958-")
    assert names[-1].startswith("sessionrec-20250101T000137-")
    stamps = [name.split("-")[1] for name in names]
    assert stamps == sorted(stamps)  # names sort by time first
    for name in names:
        kind, stamp, suffix = name.split("-")
        assert kind == "sessionrec" and len(stamp) == 15 and stamp[8] == "T"
        assert len(suffix) == 6 and int(suffix, 16) >= 0
    assert Registry(tmp_path).new_version("popularity").startswith("popularity-20")
    with pytest.raises(RegistryError, match="invalid version name"):
        Registry(tmp_path).new_version("bad/kind")


def test_empty_registry(reg: Registry) -> None:
    assert reg.versions() == []
    assert reg.current() is None
    with pytest.raises(RegistryError, match="no current version.*sessionrec train --promote"):
        reg.resolve("current")
    with pytest.raises(RegistryError, match="no committed versions"):
        reg.resolve("latest")


def test_versions_are_committed_only_oldest_first(reg: Registry) -> None:
    _commit(reg, "zeta")
    _commit(reg, "alpha")  # committed later, though it sorts first by name
    pending = reg.writer("pending", kind="sessionrec")
    pending.write_json("config.json", {})
    (reg.root / "empty-dir").mkdir()
    (reg.root / ".tmp-orphan-1234").mkdir()
    assert reg.versions() == ["zeta", "alpha"]
    assert reg.resolve("latest") == "alpha"
    pending.commit()
    assert reg.versions() == ["zeta", "alpha", "pending"]


def test_promote_and_resolve(reg: Registry) -> None:
    a = _commit(reg, "sessionrec-20240101T000000-aaaaaa")
    b = _commit(reg, "sessionrec-20240102T000000-bbbbbb")
    _commit(reg, "sasrec-20240103T000000-cccccc", kind="sasrec")
    reg.promote(a)
    assert reg.current() == a
    assert (reg.root / CURRENT_FILE).read_text() == a + "\n"
    assert [p.name for p in reg.root.iterdir() if p.name.startswith(".")] == []
    assert reg.resolve("current") == a
    assert reg.resolve("latest") == "sasrec-20240103T000000-cccccc"
    assert reg.resolve(b) == b
    assert reg.resolve("sessionrec-20240102") == b
    assert reg.resolve("sas") == "sasrec-20240103T000000-cccccc"
    with pytest.raises(RegistryError, match="ambiguous.*matches sessionrec-2024.*aaaaaa"):
        reg.resolve("sessionrec-2024")
    with pytest.raises(RegistryError, match="no version matches 'popularity'"):
        reg.resolve("popularity")
    reg.promote(b)
    assert reg.current() == b
    artifact = reg.open()
    assert artifact.version == b and artifact.read_json("config.json") == {"version": b}
    assert reg.open("latest").kind == "sasrec"


def test_promote_refuses_corrupted_version(reg: Registry) -> None:
    good = _commit(reg, "good")
    bad = _commit(reg, "bad")
    reg.promote(good)
    path = reg.path(bad) / "weights.safetensors"
    path.write_bytes(b"X" + path.read_bytes()[1:])
    with pytest.raises(RegistryError, match="refusing to promote 'bad'.*weights.safetensors"):
        reg.promote(bad)
    assert reg.current() == good


def test_promote_refuses_unknown_and_uncommitted(reg: Registry) -> None:
    with pytest.raises(RegistryError, match="no committed version"):
        reg.promote("nope")
    w = reg.writer("pending", kind="sessionrec")
    w.write_json("config.json", {})
    with pytest.raises(RegistryError, match="no committed version"):
        reg.promote("pending")
    w.abort()


def test_promote_refuses_mismatched_manifest_version(reg: Registry, tmp_path: Path) -> None:
    reg.root.mkdir(parents=True)
    with ArtifactWriter(reg.root / "renamed", version="original", kind="sessionrec") as w:
        w.write_json("config.json", {})
    with pytest.raises(RegistryError, match="manifest names version 'original'"):
        reg.promote("renamed")


def test_current_pointing_at_missing_version(reg: Registry) -> None:
    _commit(reg, "v1")
    reg.promote("v1")
    (reg.path("v1") / MANIFEST).unlink()
    with pytest.raises(RegistryError, match="points at 'v1', which is not a committed version"):
        reg.resolve("current")


@pytest.mark.parametrize("name", ["../x", "a/b", "", ".tmp-x", "current", "LATEST", "CURRENT"])
def test_bad_names_rejected(reg: Registry, name: str) -> None:
    with pytest.raises(RegistryError, match="invalid version"):
        reg.path(name)
    with pytest.raises(RegistryError, match="invalid version"):
        reg.writer(name, kind="sessionrec")
    with pytest.raises(RegistryError, match="invalid version"):
        reg.promote(name)


@pytest.mark.parametrize("ref", ["../x", "a/b", "", "x y"])
def test_bad_refs_rejected(reg: Registry, ref: str) -> None:
    _commit(reg, "v1")
    with pytest.raises(RegistryError, match="invalid version reference"):
        reg.resolve(ref)


def test_writer_refuses_existing_version(reg: Registry) -> None:
    _commit(reg, "v1")
    with pytest.raises(RegistryError, match="already exists"):
        reg.writer("v1", kind="sessionrec")
