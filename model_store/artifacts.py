"""Versioned model artifacts: a directory of files plus a checksummed ``manifest.json``.

An artifact holds everything one model version needs (config JSON, safetensors weights, item
vectors, id map, metrics, later a FAISS index). ``manifest.json`` lists every file with its
sha256 and size; :func:`open_artifact` checks them all before anything is loaded.

Durability and atomicity:

- :class:`ArtifactWriter` writes into a hidden sibling directory (``.tmp-<version>-<hex>``),
  fsyncs every file, writes the manifest last, then publishes with one ``rename`` and fsyncs
  the parent. A crash leaves at most a hidden temp directory, never a half-written version.
  ``rename`` would replace an *empty* directory, so the writer refuses an existing target
  first; a committed artifact is never empty, so ``rename`` itself refuses to overwrite one.
- :func:`add_files` grows an existing artifact: each file lands under a hidden temp name and is
  renamed into place, then the manifest is rewritten aside and swapped in with ``os.replace``.
  A reader sees the old manifest or the new one, and every file either lists is complete.
  It assumes one writer per artifact at a time (concurrent ``add_files`` calls on the same
  artifact may lose one another's manifest entries).

Metadata is JSON only; nothing here ever unpickles.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import secrets
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from types import TracebackType
from typing import Any

FORMAT = "sessionrec-artifact"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
CHUNK_BYTES = 1 << 20  # 1 MiB reads when hashing

_COMPONENT_RE = re.compile(r"[A-Za-z0-9._-]+")
_VERSION_RE = re.compile(r"[A-Za-z0-9._-]{1,128}")
_SHA256_RE = re.compile(r"[0-9a-f]{64}")


class ArtifactError(Exception):
    """An artifact is missing, malformed, or does not match its manifest."""


# --- writing -----------------------------------------------------------------------------------


class ArtifactWriter:
    """Writes an artifact aside, then publishes it with one atomic rename.

    Use as a context manager: a clean exit commits, an exception aborts (the temp directory is
    removed and nothing becomes visible)::

        with ArtifactWriter(root / version, version=version, kind="sessionrec") as w:
            w.write_json("config.json", config)
            save_file(tensors, w.path("weights.safetensors"))

    Every regular file under the temp directory is listed in the manifest, whether written
    through :meth:`write_bytes`/:meth:`write_json` or by the caller at :meth:`path`.
    """

    def __init__(
        self, target_dir: Path, *, version: str, kind: str, extra: dict[str, Any] | None = None
    ) -> None:
        self.target_dir = Path(target_dir)
        self.version = check_version(version)
        if not isinstance(kind, str) or not kind:
            raise ArtifactError(f"artifact kind must be a non-empty string, got {kind!r}")
        self.kind = kind
        self.extra = dict(extra or {})
        _check_json_serializable(self.extra, "extra")
        if self.target_dir.exists():
            raise ArtifactError(f"refusing to write artifact: {self.target_dir} already exists")
        self.target_dir.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = self.target_dir.parent / f".tmp-{self.version}-{secrets.token_hex(4)}"
        self._tmp.mkdir()
        self._reserved: set[str] = set()
        self._done = False

    def path(self, name: str) -> Path:
        """Where the caller writes file ``name`` (a relative POSIX path) inside the temp dir."""
        self._check_open()
        name = check_name(name)
        self._reserved.add(name)
        dest = self._tmp / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        return dest

    def write_bytes(self, name: str, data: bytes) -> Path:
        """Write ``data`` as file ``name``; returns its (temporary) path."""
        dest = self.path(name)
        dest.write_bytes(data)
        return dest

    def write_json(self, name: str, obj: Any) -> Path:
        """Write ``obj`` as UTF-8 JSON (sorted keys, indent 2) as file ``name``."""
        return self.write_bytes(name, _dump_json(obj))

    def commit(self) -> Path:
        """Hash and fsync every file, write the manifest, publish; returns ``target_dir``.

        On any failure the temp directory is removed and the writer is finished.
        """
        self._check_open()
        try:
            files = self._hash_and_sync_files()
            manifest = {
                "format": FORMAT,
                "format_version": FORMAT_VERSION,
                "version": self.version,
                "created_at": datetime.now(UTC).isoformat(timespec="microseconds"),
                "kind": self.kind,
                "files": files,
                "extra": self.extra,
            }
            _write_synced(self._tmp / MANIFEST, _dump_json(manifest))
            for d in sorted({p for p in self._tmp.rglob("*") if p.is_dir()} | {self._tmp}):
                fsync_dir(d)
            if self.target_dir.exists():
                raise ArtifactError(f"refusing to commit: {self.target_dir} already exists")
            try:
                os.rename(self._tmp, self.target_dir)
            except OSError as e:
                if e.errno in (errno.EEXIST, errno.ENOTEMPTY):
                    raise ArtifactError(
                        f"refusing to commit: {self.target_dir} already exists"
                    ) from e
                raise
            fsync_dir(self.target_dir.parent)
        except BaseException:
            self.abort()
            raise
        self._done = True
        return self.target_dir

    def abort(self) -> None:
        """Discard everything written so far. Safe to call more than once."""
        self._done = True
        shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> ArtifactWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is not None:
            self.abort()
        elif not self._done:
            self.commit()

    def _check_open(self) -> None:
        if self._done:
            raise ArtifactError(f"writer for {self.target_dir} is already committed or aborted")

    def _hash_and_sync_files(self) -> dict[str, dict[str, Any]]:
        files: dict[str, dict[str, Any]] = {}
        for p in sorted(self._tmp.rglob("*")):
            name = p.relative_to(self._tmp).as_posix()
            if p.is_symlink() or not (p.is_file() or p.is_dir()):
                raise ArtifactError(f"file {name!r}: only regular files may go in an artifact")
            if p.is_dir():
                continue
            check_name(name)
            files[name] = _hash_and_sync(p)
        unwritten = sorted(self._reserved - files.keys())
        if unwritten:
            raise ArtifactError(f"files reserved with path() but never written: {unwritten}")
        return files


# --- reading -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Artifact:
    """A loaded (and, unless opened with ``verify=False``, verified) artifact."""

    root: Path
    manifest: dict[str, Any]

    @property
    def version(self) -> str:
        return self.manifest["version"]

    @property
    def kind(self) -> str:
        return self.manifest["kind"]

    @property
    def created_at(self) -> str:
        return self.manifest["created_at"]

    @property
    def extra(self) -> dict[str, Any]:
        return self.manifest["extra"]

    @property
    def files(self) -> list[str]:
        """Names of the files listed in the manifest, sorted."""
        return sorted(self.manifest["files"])

    def path(self, name: str) -> Path:
        """Path of listed file ``name``; :class:`ArtifactError` for names not in the manifest."""
        if name not in self.manifest["files"]:
            raise ArtifactError(
                f"file {name!r} is not listed in the manifest of {self.root} "
                f"(listed: {', '.join(self.files) or 'none'})"
            )
        return self.root / name

    def read_bytes(self, name: str) -> bytes:
        """The file's bytes, checked against the manifest's size and sha256 *as read*.

        Loaders parse exactly these bytes, so a file swapped after `open_artifact` verified it
        is refused here rather than loaded unverified.
        """
        data = self.path(name).read_bytes()
        entry = self.manifest["files"][name]
        if len(data) != entry["bytes"]:
            raise ArtifactError(
                f"file {name!r} in {self.root}: size mismatch, expected {entry['bytes']} bytes, "
                f"read {len(data)}"
            )
        actual = hashlib.sha256(data).hexdigest()
        if actual != entry["sha256"]:
            raise ArtifactError(
                f"file {name!r} in {self.root}: sha256 mismatch, expected {entry['sha256']}, "
                f"read {actual}"
            )
        return data

    def read_json(self, name: str) -> Any:
        data = self.read_bytes(name)
        try:
            return json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ArtifactError(f"file {name!r} in {self.root} is not valid JSON: {e}") from e


def open_artifact(root: Path, *, verify: bool = True, require: Iterable[str] = ()) -> Artifact:
    """Open the artifact at ``root``, checking its manifest and (if ``verify``) every file.

    Verification streams each listed file and compares its size and sha256 with the manifest.
    ``require`` names files that must be listed (e.g. ``("config.json",)``).
    Raises :class:`ArtifactError` naming the offending file on any mismatch.
    """
    root = Path(root)
    manifest = _read_manifest(root)
    missing = sorted(set(require) - manifest["files"].keys())
    if missing:
        raise ArtifactError(f"artifact {root} lacks required files: {', '.join(missing)}")
    if verify:
        for name, entry in sorted(manifest["files"].items()):
            _verify_file(root, name, entry)
    return Artifact(root=root, manifest=manifest)


# --- growing an existing artifact ----------------------------------------------------------------


def add_files(root: Path, files: dict[str, Path], *, move: bool = False) -> None:
    """Add new files to the existing artifact at ``root`` (e.g. a FAISS index built later).

    Each source is copied (or, with ``move=True``, moved) into ``root`` under a hidden temp
    name, fsynced and renamed into place; then the manifest is rewritten aside and swapped in
    with ``os.replace``. Names already listed are refused: a published file never changes.
    A file left unlisted by an earlier interrupted call is simply replaced.
    """
    root = Path(root)
    manifest = _read_manifest(root)
    names = {check_name(name): Path(src) for name, src in files.items()}
    clash = sorted(names.keys() & manifest["files"].keys())
    if clash:
        raise ArtifactError(f"files already listed in the manifest of {root}: {clash}")
    for name, src in names.items():
        if not src.is_file():
            raise ArtifactError(f"file {name!r}: source {src} is not a regular file")

    new_entries: dict[str, dict[str, Any]] = {}
    copied_sources: list[Path] = []  # moves across filesystems: delete once published
    for name, src in names.items():
        dest = root / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.parent / f".add-{secrets.token_hex(4)}-{dest.name}"
        renamed = False
        try:
            renamed = move and _try_rename(src, tmp)
            if not renamed:
                shutil.copyfile(src, tmp)
                if move:
                    copied_sources.append(src)
            new_entries[name] = _hash_and_sync(tmp)
            os.replace(tmp, dest)
        except BaseException:
            if renamed and tmp.exists():
                os.rename(tmp, src)  # hand a moved source back rather than delete it
            tmp.unlink(missing_ok=True)
            raise
        fsync_dir(dest.parent)

    manifest["files"] = dict(sorted({**manifest["files"], **new_entries}.items()))
    tmp_manifest = root / f".manifest-{secrets.token_hex(4)}.json"
    try:
        _write_synced(tmp_manifest, _dump_json(manifest))
        os.replace(tmp_manifest, root / MANIFEST)
    except BaseException:
        tmp_manifest.unlink(missing_ok=True)
        raise
    fsync_dir(root)
    for src in copied_sources:
        src.unlink()


# --- names and hashes ----------------------------------------------------------------------------


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, streamed in 1 MiB chunks."""
    return _digest(Path(path))[0]


def check_name(name: str) -> str:
    """Validate a file name inside an artifact and return it.

    A name is a relative POSIX path whose components use ``[A-Za-z0-9._-]`` and do not start
    with ``.`` (hidden names are reserved for temp files; this also rules out ``..``).
    ``manifest.json`` is reserved.
    """
    if not isinstance(name, str) or not name:
        raise ArtifactError(f"invalid artifact file name {name!r}: must be a non-empty string")
    parts = name.split("/")
    if name.startswith("/") or any(
        not _COMPONENT_RE.fullmatch(part) or part.startswith(".") for part in parts
    ):
        raise ArtifactError(
            f"invalid artifact file name {name!r}: use a relative path of [A-Za-z0-9._-] "
            "components, none empty or starting with '.'"
        )
    if name == MANIFEST:
        raise ArtifactError(f"invalid artifact file name {name!r}: reserved for the manifest")
    return str(PurePosixPath(name))


def check_version(version: str) -> str:
    """Validate a version name (``[A-Za-z0-9._-]``, 1-128 chars, not starting with ``.``)."""
    if (
        not isinstance(version, str)
        or not _VERSION_RE.fullmatch(version)
        or version.startswith(".")
    ):
        raise ArtifactError(
            f"invalid version name {version!r}: use 1-128 characters of [A-Za-z0-9._-], "
            "not starting with '.'"
        )
    return version


# --- helpers -----------------------------------------------------------------------------------


def _read_manifest(root: Path) -> dict[str, Any]:
    """Load and structurally validate ``root/manifest.json``."""
    path = root / MANIFEST
    if not root.is_dir():
        raise ArtifactError(f"no artifact at {root}: not a directory")
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ArtifactError(
            f"no {MANIFEST} in {root}: not an artifact, or an unfinished write"
        ) from None
    try:
        manifest = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{MANIFEST} in {root} is not valid JSON: {e}") from e

    def bad(why: str) -> ArtifactError:
        return ArtifactError(f"{MANIFEST} in {root}: {why}")

    if not isinstance(manifest, dict):
        raise bad("expected a JSON object")
    if manifest.get("format") != FORMAT:
        raise bad(f"format is {manifest.get('format')!r}, expected {FORMAT!r}")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise bad(
            f"unsupported format_version {manifest.get('format_version')!r} "
            f"(this code reads {FORMAT_VERSION})"
        )
    for key in ("version", "kind", "created_at"):
        if not isinstance(manifest.get(key), str):
            raise bad(f"{key!r} must be a string")
    if not isinstance(manifest.get("extra", {}), dict):
        raise bad("'extra' must be an object")
    manifest.setdefault("extra", {})
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise bad("'files' must be an object")
    for name, entry in files.items():
        try:
            check_name(name)
        except ArtifactError as e:
            raise bad(str(e)) from None
        if (
            not isinstance(entry, dict)
            or not isinstance(entry.get("sha256"), str)
            or not _SHA256_RE.fullmatch(entry["sha256"])
            or type(entry.get("bytes")) is not int
            or entry["bytes"] < 0
        ):
            raise bad(f"entry for file {name!r} needs 'sha256' (64 hex) and 'bytes' (int >= 0)")
    return manifest


def _verify_file(root: Path, name: str, entry: dict[str, Any]) -> None:
    path = root / name
    if not path.is_file():
        raise ArtifactError(f"file {name!r} listed in the manifest is missing from {root}")
    size = path.stat().st_size
    if size != entry["bytes"]:
        raise ArtifactError(
            f"file {name!r} in {root}: size mismatch, expected {entry['bytes']} bytes, found {size}"
        )
    actual = sha256_file(path)
    if actual != entry["sha256"]:
        raise ArtifactError(
            f"file {name!r} in {root}: sha256 mismatch, expected {entry['sha256']}, found {actual}"
        )


def _digest(path: Path, *, sync: bool = False) -> tuple[str, int]:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            h.update(chunk)
            size += len(chunk)
        if sync:
            os.fsync(f.fileno())
    return h.hexdigest(), size


def _hash_and_sync(path: Path) -> dict[str, Any]:
    digest, size = _digest(path, sync=True)
    return {"sha256": digest, "bytes": size}


def _try_rename(src: Path, dest: Path) -> bool:
    """Rename ``src`` to ``dest``; False (nothing done) when they are on different filesystems."""
    try:
        os.rename(src, dest)
    except OSError as e:
        if e.errno == errno.EXDEV:
            return False
        raise
    return True


def _dump_json(obj: Any) -> bytes:
    return (json.dumps(obj, sort_keys=True, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def _check_json_serializable(obj: Any, what: str) -> None:
    try:
        json.dumps(obj)
    except (TypeError, ValueError) as e:
        raise ArtifactError(f"{what} must be JSON-serializable: {e}") from e


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
