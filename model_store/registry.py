"""A small on-disk registry of artifact versions.

Layout::

    <root>/<version>/manifest.json ...   committed artifacts (see model_store.artifacts)
    <root>/.tmp-<version>-<hex>/         writes in progress or abandoned (ignored)
    <root>/CURRENT                       the promoted version's name, one line

``CURRENT`` is replaced atomically (temp file in ``root``, fsync, ``os.replace``, fsync of
``root``), so a reader always sees a whole version name. Versions are ordered by their
manifest's ``created_at`` (microseconds, UTC), then by name: names made by
:meth:`Registry.new_version` also sort by time within a kind, but a registry may hold several
kinds (``sessionrec``, ``sasrec``, ``popularity``), whose names do not sort by time together.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from model_store.artifacts import (
    MANIFEST,
    Artifact,
    ArtifactError,
    ArtifactWriter,
    check_version,
    fsync_dir,
    open_artifact,
)

CURRENT_FILE = "CURRENT"
_RESERVED = {"current", "latest"}  # refs with a meaning of their own (and the pointer file)


class RegistryError(Exception):
    """A version reference cannot be resolved, or a registry operation is refused."""


class Registry:
    """Versions of model artifacts under one root directory, with a ``CURRENT`` pointer."""

    def __init__(self, root: Path, *, clock: Callable[[], datetime] | None = None) -> None:
        self.root = Path(root)
        self._clock = clock or _utcnow  # injectable for tests of version naming

    def new_version(self, kind: str) -> str:
        """A fresh, unique version name: ``{kind}-{UTC yyyymmddTHHMMSS}-{6 hex}``."""
        stamp = self._clock().astimezone(UTC).strftime("%Y%m%dT%H%M%S")
        return _check_version(f"{kind}-{stamp}-{secrets.token_hex(3)}")

    def writer(
        self, version: str, *, kind: str, extra: dict[str, Any] | None = None
    ) -> ArtifactWriter:
        """An :class:`ArtifactWriter` that publishes ``version`` into this registry."""
        target = self.path(version)
        if target.exists():
            raise RegistryError(f"version {version!r} already exists in {self.root}")
        self.root.mkdir(parents=True, exist_ok=True)
        return ArtifactWriter(target, version=version, kind=kind, extra=extra)

    def versions(self) -> list[str]:
        """Committed versions (directories with a manifest), oldest first."""
        if not self.root.is_dir():
            return []
        found = []
        for d in self.root.iterdir():
            if d.name.startswith(".") or not _is_version_name(d.name):
                continue
            if d.is_dir() and (d / MANIFEST).is_file():
                found.append((_created_at(d), d.name))
        return [name for _, name in sorted(found)]

    def current(self) -> str | None:
        """The promoted version's name, or None when nothing has been promoted."""
        try:
            text = (self.root / CURRENT_FILE).read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            return None
        if not _is_version_name(text):
            raise RegistryError(f"{self.root / CURRENT_FILE} holds an invalid version {text!r}")
        return text

    def promote(self, version: str) -> None:
        """Point ``CURRENT`` at ``version`` after verifying it in full."""
        path = self.path(version)
        if not (path / MANIFEST).is_file():
            raise RegistryError(
                f"cannot promote {version!r}: no committed version of that name in {self.root}"
            )
        try:
            artifact = open_artifact(path, verify=True)
        except ArtifactError as e:
            raise RegistryError(f"refusing to promote {version!r}: {e}") from e
        if artifact.version != version:
            raise RegistryError(
                f"refusing to promote {version!r}: its manifest names version {artifact.version!r}"
            )
        tmp = self.root / f".{CURRENT_FILE}-{secrets.token_hex(4)}"
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(version + "\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.root / CURRENT_FILE)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        fsync_dir(self.root)

    def resolve(self, ref: str) -> str:
        """``"current"``, ``"latest"``, an exact version or a unique prefix → a version name."""
        if ref == "current":
            version = self.current()
            if version is None:
                raise RegistryError(
                    f"no current version in {self.root}: run `sessionrec train --promote` "
                    "or `sessionrec ... promote <version>`"
                )
            if version not in self.versions():
                raise RegistryError(
                    f"{self.root / CURRENT_FILE} points at {version!r}, "
                    "which is not a committed version"
                )
            return version
        versions = self.versions()
        if ref == "latest":
            if not versions:
                raise RegistryError(f"no committed versions in {self.root}")
            return versions[-1]
        if not isinstance(ref, str) or not ref or not _is_version_name(ref):
            raise RegistryError(
                f"invalid version reference {ref!r}: use 'current', 'latest', "
                "a version name or a unique prefix of one"
            )
        if ref in versions:
            return ref
        matches = [v for v in versions if v.startswith(ref)]
        if len(matches) == 1:
            return matches[0]
        if not matches:
            raise RegistryError(f"no version matches {ref!r} in {self.root}")
        raise RegistryError(
            f"version prefix {ref!r} is ambiguous in {self.root}: matches {', '.join(matches)}"
        )

    def open(self, ref: str = "current", *, verify: bool = True) -> Artifact:
        """Resolve ``ref`` and open that artifact (verified by default).

        Raises :class:`RegistryError` for a bad reference and
        :class:`~model_store.artifacts.ArtifactError` for a damaged artifact.
        """
        return open_artifact(self.path(self.resolve(ref)), verify=verify)

    def path(self, version: str) -> Path:
        """Directory of ``version`` (which need not exist yet)."""
        return self.root / _check_version(version)


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _check_version(version: str) -> str:
    try:
        check_version(version)
    except ArtifactError as e:
        raise RegistryError(str(e)) from None
    if version.lower() in _RESERVED:
        raise RegistryError(f"invalid version name {version!r}: reserved")
    return version


def _is_version_name(name: str) -> bool:
    try:
        _check_version(name)
    except RegistryError:
        return False
    return True


def _created_at(version_dir: Path) -> datetime:
    """Commit time from the manifest; the epoch for unreadable ones (they sort oldest)."""
    try:
        manifest = json.loads((version_dir / MANIFEST).read_text(encoding="utf-8"))
        created = datetime.fromisoformat(manifest["created_at"])
    except (OSError, ValueError, KeyError, TypeError):
        return datetime.fromtimestamp(0, UTC)
    return created if created.tzinfo else created.replace(tzinfo=UTC)
