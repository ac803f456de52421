"""Self-describing bytes for the per-user state kept in Redis. Never pickle.

Two record kinds share one header::

    magic  b"SRST"  (4)
    format version  u16   (this code writes and reads 1)
    kind            u8    (1 = closed session, 2 = K/V cache)
    reserved        u8

**Closed session** (one entry of the raw session log; item ids stay *external* so a new
model with another catalogue can rebuild from the same log)::

    session_id   u16 length + UTF-8
    started_at   i64 Unix seconds
    ended_at     i64 Unix seconds
    n_items      u32
    n_items × (label u8, item_id u16 length + UTF-8)

**K/V cache** (per-layer keys/values of the last W sessions, tagged with the model version and
the log sequence number it was built from, so a stale cache is detected on read; the end time
of the newest cached session rides along so a recommendation needs no read of the log)::

    model_version  u16 length + UTF-8
    log_seq        u64
    last_ended_at  i64 Unix seconds (ended_at of the newest session in the cache)
    dtype          u8    (1 = float32, 2 = float16)
    shape          4 × u32   (L, H, n, Dh)
    payload        K then V, little-endian, C order

Every decoder checks magic, version, kind and exact lengths and raises `StateFormatError`
saying what is wrong; nothing is interpreted from a truncated or foreign value.
"""

from __future__ import annotations

import enum
import math
import struct
from dataclasses import dataclass

import numpy as np

MAGIC = b"SRST"
FORMAT_VERSION = 1
_HEADER = struct.Struct("<4sHBB")
_SESSION_FIXED = struct.Struct("<qqI")
_KV_FIXED = struct.Struct("<QqB4I")
MAX_ID_BYTES = 0xFFFF


class StateFormatError(ValueError):
    """Bytes that are not a state record of a format this code reads."""


class RecordKind(enum.IntEnum):
    SESSION = 1
    KV = 2


class KVDType(enum.IntEnum):
    FLOAT32 = 1
    FLOAT16 = 2

    @property
    def numpy(self) -> np.dtype:
        return np.dtype("<f4") if self is KVDType.FLOAT32 else np.dtype("<f2")


@dataclass(frozen=True)
class SessionRecord:
    session_id: str
    started_at: int
    ended_at: int
    items: tuple[str, ...]  # external item ids, in session order
    labels: tuple[int, ...]  # 1 = positive, 0 = shown, not engaged

    def __post_init__(self) -> None:
        if len(self.items) != len(self.labels):
            raise ValueError(f"{len(self.items)} items but {len(self.labels)} labels")
        if any(label not in (0, 1) for label in self.labels):
            raise ValueError("labels must be 0 or 1")


@dataclass(frozen=True)
class KVState:
    model_version: str
    log_seq: int  # the session-log sequence number this cache reflects
    last_ended_at: int  # ended_at of the newest cached session (the query's time gap)
    k: np.ndarray  # (L, H, n, Dh)
    v: np.ndarray  # (L, H, n, Dh)


def encode_session(record: SessionRecord) -> bytes:
    parts = [
        _HEADER.pack(MAGIC, FORMAT_VERSION, RecordKind.SESSION, 0),
        _pack_str(record.session_id),
    ]
    parts.append(_SESSION_FIXED.pack(record.started_at, record.ended_at, len(record.items)))
    for item, label in zip(record.items, record.labels, strict=True):
        parts.append(bytes([label]))
        parts.append(_pack_str(item))
    return b"".join(parts)


def decode_session(data: bytes) -> SessionRecord:
    reader = _Reader(data, RecordKind.SESSION)
    session_id = reader.string()
    started_at, ended_at, n = reader.unpack(_SESSION_FIXED)
    items, labels = [], []
    for _ in range(n):
        labels.append(reader.take(1)[0])
        items.append(reader.string())
    reader.end()
    try:
        return SessionRecord(session_id, started_at, ended_at, tuple(items), tuple(labels))
    except ValueError as exc:
        raise StateFormatError(f"session record: {exc}") from exc


def encode_kv(state: KVState, dtype: KVDType = KVDType.FLOAT32) -> bytes:
    if state.k.shape != state.v.shape or state.k.ndim != 4:
        raise ValueError(f"k {state.k.shape} and v {state.v.shape} must be equal (L, H, n, Dh)")
    header = _HEADER.pack(MAGIC, FORMAT_VERSION, RecordKind.KV, 0)
    fixed = _KV_FIXED.pack(state.log_seq, state.last_ended_at, dtype, *state.k.shape)
    payload = [np.ascontiguousarray(x, dtype=dtype.numpy).tobytes() for x in (state.k, state.v)]
    return b"".join([header, _pack_str(state.model_version), fixed, *payload])


def decode_kv(data: bytes) -> KVState:
    reader = _Reader(data, RecordKind.KV)
    model_version = reader.string()
    log_seq, last_ended_at, dtype_code, *shape = reader.unpack(_KV_FIXED)
    try:
        dtype = KVDType(dtype_code)
    except ValueError:
        raise StateFormatError(f"K/V record: unknown dtype code {dtype_code}") from None
    count = math.prod(shape)  # Python ints: a corrupt shape cannot overflow
    nbytes = count * dtype.numpy.itemsize
    k = np.frombuffer(reader.take(nbytes), dtype=dtype.numpy).reshape(shape)
    v = np.frombuffer(reader.take(nbytes), dtype=dtype.numpy).reshape(shape)
    reader.end()
    # float32 records are used as read (no copy); float16 ones are widened once, here.
    return KVState(
        model_version,
        log_seq,
        last_ended_at,
        k.astype(np.float32, copy=False),
        v.astype(np.float32, copy=False),
    )


def _pack_str(text: str) -> bytes:
    raw = text.encode("utf-8")
    if len(raw) > MAX_ID_BYTES:
        raise ValueError(f"id of {len(raw)} bytes is longer than {MAX_ID_BYTES}")
    return struct.pack("<H", len(raw)) + raw


class _Reader:
    """Bounds-checked reads over one record; every shortfall is a StateFormatError."""

    def __init__(self, data: bytes, kind: RecordKind) -> None:
        self.data = memoryview(data)
        self.pos = 0
        magic, version, got_kind, _ = self.unpack(_HEADER)
        if magic != MAGIC:
            raise StateFormatError(f"not a sessionrec state record (magic {bytes(magic)!r})")
        if version != FORMAT_VERSION:
            raise StateFormatError(
                f"state format version {version}; this code reads {FORMAT_VERSION}"
            )
        if got_kind != kind:
            raise StateFormatError(f"expected a {kind.name} record, got kind {got_kind}")

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise StateFormatError(
                f"record truncated: needs {self.pos + n} bytes, has {len(self.data)}"
            )
        out = bytes(self.data[self.pos : self.pos + n])
        self.pos += n
        return out

    def unpack(self, layout: struct.Struct) -> tuple:
        return layout.unpack(self.take(layout.size))

    def string(self) -> str:
        (n,) = struct.unpack("<H", self.take(2))
        try:
            return self.take(n).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise StateFormatError(f"invalid UTF-8 id: {exc}") from exc

    def end(self) -> None:
        if self.pos != len(self.data):
            raise StateFormatError(f"{len(self.data) - self.pos} trailing bytes after the record")
