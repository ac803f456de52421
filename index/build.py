"""Build, tune, save and load the FAISS index over item vectors (scores are inner products).

Index kinds and the AUTO rule:

- ``FLAT`` (``IndexFlatIP``): exact. A query costs N·d multiply-adds, about 1 ms at
  100k × 64 on one core, so below ``AUTO_FLAT_MAX_ITEMS`` (100k) items AUTO picks it: exact
  results, no training, no tuning, and it moves to a GPU.
- ``IVF`` (``IndexIVFFlat``, ``nlist`` ≈ 4·√N lists): AUTO's choice at 100k items and above.
  It trains k-means on a seeded sample, builds fast, keeps raw vectors (no quantisation
  error), and — unlike HNSW — has a GPU implementation. ``nprobe`` is tuned at build time to
  the smallest power of two that reaches ``recall_target`` recall@100 against exact search.
- ``HNSW`` (``IndexHNSWFlat``): best CPU latency at high recall, but slower to build, more
  memory (graph links) and CPU only; pick it explicitly.

The chosen default search parameters live on the index itself (``index.nprobe``,
``index.hnsw.efSearch``, both serialised by FAISS) and in the JSON sidecar; searches never
change them — per-call overrides go through ``faiss.SearchParameters*`` (see ``search.py``).

On disk an index is two files: the ``faiss.serialize_index`` bytes and a JSON sidecar
(:class:`IndexMeta`) holding kind, shape, search defaults, FAISS version and the sha256 of the
bytes. FAISS may crash or throw on garbage input, so the checksum is verified *before*
``deserialize_index`` ever sees the bytes; then ``n``/``d``/metric are checked against the
sidecar. Both files are written aside and renamed into place.
"""

from __future__ import annotations

import enum
import hashlib
import json
import logging
import math
import os
import secrets
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from tqdm.auto import tqdm

from model_store.artifacts import Artifact, add_files

log = logging.getLogger(__name__)

AUTO_FLAT_MAX_ITEMS = 100_000
INDEX_FILE = "item_index.faiss"  # names inside a model artifact
INDEX_META_FILE = "item_index.json"
META_FORMAT = "sessionrec-faiss-index"
META_FORMAT_VERSION = 1
MIN_POINTS_PER_CENTROID = 39  # FAISS k-means warns below this many training points per list
MAX_TRAIN_PER_CENTROID = 256
ADD_CHUNK = 100_000


class IndexKind(enum.StrEnum):
    FLAT = "flat"
    IVF = "ivf"
    HNSW = "hnsw"
    AUTO = "auto"


class IndexLoadError(Exception):
    """An index file or its sidecar is missing, corrupt, or does not match the other."""


@dataclass(frozen=True)
class IndexConfig:
    """How to build an index. ``nlist=None`` means ≈ 4·√N (capped so k-means has data)."""

    kind: IndexKind = IndexKind.AUTO
    nlist: int | None = None
    nprobe: int | None = None  # None: tune to recall_target; an int skips tuning
    recall_target: float = 0.95
    tune_k: int = 100
    tune_queries: int = 256
    hnsw_m: int = 32
    ef_construction: int = 200
    ef_search: int = 128
    seed: int = 0


@dataclass(frozen=True)
class IndexMeta:
    """The JSON sidecar: what the index bytes are and how to search them by default."""

    kind: str  # resolved IndexKind value, never "auto"
    n: int
    d: int
    nlist: int | None
    nprobe: int | None
    ef_search: int | None
    faiss_version: str
    sha256: str
    bytes: int
    format: str = META_FORMAT
    format_version: int = META_FORMAT_VERSION

    def to_json(self) -> bytes:
        return (json.dumps(asdict(self), sort_keys=True, indent=2) + "\n").encode("utf-8")

    @classmethod
    def from_json(cls, data: bytes, *, source: str) -> IndexMeta:
        try:
            raw = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise IndexLoadError(f"{source}: index sidecar is not valid JSON: {e}") from e
        if not isinstance(raw, dict) or raw.get("format") != META_FORMAT:
            raise IndexLoadError(f"{source}: not a {META_FORMAT} sidecar")
        if raw.get("format_version") != META_FORMAT_VERSION:
            raise IndexLoadError(
                f"{source}: unsupported format_version {raw.get('format_version')!r}"
            )
        try:
            meta = cls(**raw)
        except TypeError as e:
            raise IndexLoadError(f"{source}: malformed index sidecar: {e}") from e
        if not all(type(v) is int and v >= 0 for v in (meta.n, meta.d, meta.bytes)) or not (
            isinstance(meta.sha256, str) and len(meta.sha256) == 64
        ):
            raise IndexLoadError(f"{source}: n, d, bytes must be ints >= 0 and sha256 64 hex")
        if meta.kind not in (IndexKind.FLAT, IndexKind.IVF, IndexKind.HNSW):
            raise IndexLoadError(f"{source}: unknown index kind {meta.kind!r}")
        return meta


# --- building ------------------------------------------------------------------------------------


def resolve_kind(kind: IndexKind, n: int) -> IndexKind:
    """AUTO → FLAT below ``AUTO_FLAT_MAX_ITEMS`` items, IVF at and above."""
    if kind is not IndexKind.AUTO:
        return kind
    return IndexKind.FLAT if n < AUTO_FLAT_MAX_ITEMS else IndexKind.IVF


def auto_nlist(n: int) -> int:
    """≈ 4·√N lists, but at most N/39 so every centroid trains on enough points."""
    return max(1, min(int(round(4 * math.sqrt(n))), n // MIN_POINTS_PER_CENTROID))


def build_index(
    vectors: np.ndarray, config: IndexConfig = IndexConfig(), queries: np.ndarray | None = None
) -> faiss.Index:
    """Build an inner-product index over ``vectors`` (N, d) float32.

    For IVF without a fixed ``config.nprobe``, ``nprobe`` is tuned on ``queries`` (default:
    :func:`sample_queries`, perturbed item vectors) and stored as ``index.nprobe``. For HNSW,
    ``index.hnsw.efSearch = config.ef_search``. Read them back with :func:`index_meta`.
    """
    vectors = _as_matrix(vectors)
    n, d = vectors.shape
    if n == 0:
        raise ValueError("cannot build an index over zero items")
    kind = resolve_kind(config.kind, n)
    if kind is IndexKind.FLAT:
        index = faiss.IndexFlatIP(d)
    elif kind is IndexKind.IVF:
        nlist = config.nlist or auto_nlist(n)
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = config.seed
        rng = np.random.default_rng(config.seed)
        n_train = min(n, nlist * MAX_TRAIN_PER_CENTROID)
        sample = vectors[np.sort(rng.choice(n, size=n_train, replace=False))]
        log.info("training IVF: nlist=%d on %d of %d vectors", nlist, n_train, n)
        index.train(sample)
    elif kind is IndexKind.HNSW:
        index = faiss.IndexHNSWFlat(d, config.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = config.ef_construction
        index.hnsw.efSearch = config.ef_search
    else:
        raise ValueError(f"unknown index kind {config.kind!r}")
    starts = range(0, n, ADD_CHUNK)
    for start in tqdm(starts, desc=f"add {kind.value}", disable=len(starts) < 5, leave=False):
        index.add(vectors[start : start + ADD_CHUNK])

    if kind is IndexKind.IVF:
        if config.nprobe is not None:
            index.nprobe = min(config.nprobe, index.nlist)
        else:
            if queries is None:
                queries = sample_queries(vectors, config.tune_queries, seed=config.seed + 1)
            index.nprobe = tune_nprobe(
                index, vectors, queries, target=config.recall_target, k=config.tune_k
            )
        log.info("IVF nprobe=%d of nlist=%d", index.nprobe, index.nlist)
    return index


def sample_queries(vectors: np.ndarray, n: int, *, seed: int, noise: float = 0.5) -> np.ndarray:
    """Held-out-style tuning queries: seeded item vectors plus Gaussian noise, renormalised.

    The noise (relative to a unit vector) keeps a query from trivially matching its own item.
    """
    rng = np.random.default_rng(seed)
    rows = rng.choice(len(vectors), size=min(n, len(vectors)), replace=False)
    q = vectors[rows] + noise * rng.standard_normal((len(rows), vectors.shape[1])).astype(
        np.float32
    ) / math.sqrt(vectors.shape[1])
    return _normalise(q.astype(np.float32))


def tune_nprobe(
    index: faiss.Index,
    vectors: np.ndarray,
    queries: np.ndarray,
    *,
    target: float = 0.95,
    k: int = 100,
) -> int:
    """Smallest nprobe in 1, 2, 4, … (then nlist) whose recall@k vs exact reaches ``target``.

    Uses per-call ``SearchParametersIVF``; ``index.nprobe`` is not touched.
    """
    ivf = faiss.extract_index_ivf(index)
    k = min(k, len(vectors))
    exact_rows, _ = exact_search(vectors, queries, k)
    candidates = [p for p in (2**i for i in range(32)) if p < ivf.nlist] + [ivf.nlist]
    for nprobe in candidates:
        _, rows = index.search(queries, k, params=faiss.SearchParametersIVF(nprobe=nprobe))
        recall = recall_at_k(rows, exact_rows, k)
        log.debug("nprobe=%d recall@%d=%.4f", nprobe, k, recall)
        if recall >= target:
            return nprobe
    return ivf.nlist


def index_meta(index: faiss.Index, data: np.ndarray | bytes | None = None) -> IndexMeta:
    """Describe ``index``; ``data`` is its serialised bytes (serialised here when omitted)."""
    if data is None:
        data = faiss.serialize_index(index)
    raw = memoryview(data).cast("B")
    base = faiss.downcast_index(index)
    nlist = nprobe = ef_search = None
    if isinstance(base, faiss.IndexIVF):
        kind, nlist, nprobe = IndexKind.IVF, base.nlist, base.nprobe
    elif isinstance(base, faiss.IndexHNSW):
        kind, ef_search = IndexKind.HNSW, base.hnsw.efSearch
    elif isinstance(base, faiss.IndexFlat):
        kind = IndexKind.FLAT
    else:
        raise ValueError(f"unsupported index type {type(base).__name__}")
    return IndexMeta(
        kind=kind.value,
        n=int(index.ntotal),
        d=int(index.d),
        nlist=nlist,
        nprobe=nprobe,
        ef_search=ef_search,
        faiss_version=faiss.__version__,
        sha256=hashlib.sha256(raw).hexdigest(),
        bytes=raw.nbytes,
    )


# --- exact search and recall ---------------------------------------------------------------------


def exact_search(
    vectors: np.ndarray, queries: np.ndarray, k: int, *, max_floats: int = 1 << 24
) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force top-k by inner product in numpy: (rows (B, k) int64, scores (B, k) float32).

    Scores descending; ties broken by the lower row. ``vectors`` is scanned in chunks of
    ``max_floats // B`` rows so the score block stays near ``max_floats`` floats (64 MiB).
    """
    vectors, queries = _as_matrix(vectors), _as_matrix(queries)
    n = len(vectors)
    k = min(k, n)
    b = len(queries)
    chunk = max(1024, max_floats // max(b, 1))
    best_s = np.full((b, 0), -np.inf, dtype=np.float32)
    best_r = np.empty((b, 0), dtype=np.int64)
    for start in range(0, n, chunk):
        s = queries @ vectors[start : start + chunk].T  # (B, C)
        r = np.broadcast_to(np.arange(start, start + s.shape[1], dtype=np.int64), s.shape)
        s, r = np.concatenate([best_s, s], 1), np.concatenate([best_r, r], 1)
        if s.shape[1] > k:
            part = np.argpartition(-s, k - 1, axis=1)[:, :k]
            s, r = np.take_along_axis(s, part, 1), np.take_along_axis(r, part, 1)
        best_s, best_r = s, r
    order = np.lexsort((best_r, -best_s), axis=1)
    return np.take_along_axis(best_r, order, 1), np.take_along_axis(best_s, order, 1)


def recall_at_k(approx_rows: np.ndarray, exact_rows: np.ndarray, k: int) -> float:
    """Mean over queries of |approx top-k ∩ exact top-k| / |exact top-k| (−1 padding ignored)."""
    total = hits = 0
    for a, e in zip(np.asarray(approx_rows)[:, :k], np.asarray(exact_rows)[:, :k], strict=True):
        e = e[e >= 0]
        hits += np.intersect1d(a[a >= 0], e).size
        total += e.size
    return hits / total if total else 1.0


# --- files ---------------------------------------------------------------------------------------


def save_index(index: faiss.Index, path: Path, meta_path: Path | None = None) -> IndexMeta:
    """Write the index bytes and its JSON sidecar (default ``<path>.json``), each aside first."""
    path = Path(path)
    meta_path = Path(meta_path) if meta_path is not None else _default_meta_path(path)
    data = faiss.serialize_index(index)
    meta = index_meta(index, data)
    _write_atomic(path, memoryview(data).cast("B"))
    _write_atomic(meta_path, meta.to_json())
    return meta


def load_index(path: Path, meta_path: Path | None = None) -> tuple[faiss.Index, IndexMeta]:
    """Read an index saved by :func:`save_index`, refusing anything that fails its checks."""
    path = Path(path)
    meta_path = Path(meta_path) if meta_path is not None else _default_meta_path(path)
    try:
        meta = IndexMeta.from_json(meta_path.read_bytes(), source=str(meta_path))
        data = path.read_bytes()
    except OSError as e:
        raise IndexLoadError(f"cannot read index: {e}") from e
    return deserialize_checked(data, meta, source=str(path)), meta


def deserialize_checked(data: bytes, meta: IndexMeta, *, source: str) -> faiss.Index:
    """Checksum, then deserialise, then check shape and metric against ``meta``."""
    if len(data) != meta.bytes:
        raise IndexLoadError(
            f"{source}: size mismatch, expected {meta.bytes} bytes, read {len(data)} (truncated?)"
        )
    actual = hashlib.sha256(data).hexdigest()
    if actual != meta.sha256:
        raise IndexLoadError(f"{source}: sha256 mismatch, expected {meta.sha256}, read {actual}")
    try:
        index = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
    except RuntimeError as e:
        raise IndexLoadError(f"{source}: FAISS could not read the index: {e}") from e
    if (index.ntotal, index.d) != (meta.n, meta.d):
        raise IndexLoadError(
            f"{source}: index holds ({index.ntotal}, {index.d}), sidecar says ({meta.n}, {meta.d})"
        )
    if index.metric_type != faiss.METRIC_INNER_PRODUCT:
        raise IndexLoadError(f"{source}: index metric is not inner product")
    return index


def add_index_to_artifact(artifact_root: Path, index: faiss.Index) -> IndexMeta:
    """Add ``item_index.faiss`` + ``item_index.json`` to an existing model artifact.

    Both are written to a hidden temp directory beside the artifact, then handed to
    :func:`model_store.artifacts.add_files`, which renames them in and lists their sha256.
    """
    artifact_root = Path(artifact_root)
    tmp = Path(tempfile.mkdtemp(prefix=f".index-{secrets.token_hex(4)}-", dir=artifact_root.parent))
    try:
        meta = save_index(index, tmp / INDEX_FILE, tmp / INDEX_META_FILE)
        add_files(
            artifact_root,
            {INDEX_FILE: tmp / INDEX_FILE, INDEX_META_FILE: tmp / INDEX_META_FILE},
            move=True,
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return meta


def load_index_from_artifact(artifact: Artifact) -> tuple[faiss.Index, IndexMeta]:
    """Load the index listed in a model artifact.

    Bytes come through ``artifact.read_bytes`` (manifest-verified; a mismatch raises
    ``ArtifactError``), then pass the sidecar checks of :func:`deserialize_checked`.
    """
    source = str(artifact.root / INDEX_FILE)
    meta = IndexMeta.from_json(
        artifact.read_bytes(INDEX_META_FILE), source=str(artifact.root / INDEX_META_FILE)
    )
    return deserialize_checked(artifact.read_bytes(INDEX_FILE), meta, source=source), meta


# --- helpers -------------------------------------------------------------------------------------


def _as_matrix(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"expected a 2-d array, got shape {x.shape}")
    return x


def _normalise(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _default_meta_path(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def _write_atomic(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
