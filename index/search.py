"""Top-k item retrieval with per-query exclusions, on GPU when FAISS has one.

Exclusion policy (``ItemIndex.search``): each query asks for ``k`` items minus a set of
excluded rows (already seen, already bought). The index is searched once for
``k + max_b |exclude_b|`` candidates (capped at N), so masking the excluded rows still leaves
``k``. Approximate indexes can come back short (IVF returns -1 padding when the probed lists
hold too few items), so a short query is retried once with 4× the fetch, and if still short,
answered by exact search over its non-excluded rows. Every query therefore gets exactly
``min(k, N - |exclude_b ∩ [0, N)|)`` rows, never an excluded one; ``exhausted`` marks those
for which that is fewer than ``k``.

GPU: at construction, when ``faiss.get_num_gpus() > 0`` and the build has
``StandardGpuResources``, a GPU copy is made; the CPU index is always kept, and it answers
whenever the GPU cannot (k or fetch above ``GPU_MAX_K`` = 2048, or an index type without a
GPU version such as HNSW).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np
from safetensors.numpy import load as load_safetensors

from index.build import (
    IndexKind,
    IndexLoadError,
    IndexMeta,
    exact_search,
    index_meta,
    load_index_from_artifact,
    recall_at_k,
)
from model_store.artifacts import Artifact

log = logging.getLogger(__name__)

GPU_MAX_K = 2048  # FAISS GPU k-selection limit (k and nprobe)
RETRY_GROWTH = 4
ITEM_VECTORS_FILE = "item_vectors.safetensors"  # as written by model_store.store (no torch here)
ID_MAP_FILE = "id_map.json"


@dataclass(frozen=True)
class SearchParams:
    """Per-call overrides; ``None`` keeps the index's default from its sidecar."""

    nprobe: int | None = None  # IVF
    ef_search: int | None = None  # HNSW


@dataclass(frozen=True)
class SearchResult:
    """Per query b: ``rows[b]`` (int64, 0..N-1), ``scores[b]`` (float32, descending), ``ids[b]``
    (external item ids), all of length ``min(k, N - |exclude_b|)``; ``exhausted[b]`` is True
    when that is fewer than ``k``."""

    rows: list[np.ndarray]
    scores: list[np.ndarray]
    ids: list[list[str]]
    exhausted: np.ndarray  # (B,) bool


class ItemIndex:
    """A FAISS index over item vectors plus the row → external id map.

    Not thread-safe: FAISS GPU indexes must not be searched concurrently, so use one
    ``ItemIndex`` from one thread (e.g. the single runner that owns the device).
    ``vectors`` (N, d) float32 are kept (not copied when already float32 C-contiguous) for
    the exact fallback; they may share memory with the loaded model's item vectors.
    """

    def __init__(
        self,
        index: faiss.Index,
        item_ids: Sequence[str],
        vectors: np.ndarray,
        *,
        meta: IndexMeta | None = None,
        use_gpu: bool | None = None,
    ) -> None:
        self.meta = meta if meta is not None else index_meta(index)
        self.kind = IndexKind(self.meta.kind)
        self.cpu_index = index
        self.vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        self.item_ids = np.asarray(list(item_ids), dtype=object)
        n, d = index.ntotal, index.d
        if self.vectors.shape != (n, d) or len(self.item_ids) != n:
            raise ValueError(
                f"index holds ({n}, {d}) but got vectors {self.vectors.shape} "
                f"and {len(self.item_ids)} item ids"
            )
        self._gpu_resources, self.gpu_index = _to_gpu(index, use_gpu)

    @classmethod
    def from_artifact(cls, artifact: Artifact, *, use_gpu: bool | None = None) -> ItemIndex:
        """Load index, item vectors and id map from a verified model artifact.

        Every file is read through ``artifact.read_bytes`` (checksummed); shapes must agree.
        """
        index, meta = load_index_from_artifact(artifact)
        vectors = load_safetensors(artifact.read_bytes(ITEM_VECTORS_FILE)).get("vectors")
        item_ids = artifact.read_json(ID_MAP_FILE).get("items")
        if vectors is None or vectors.shape != (meta.n, meta.d):
            shape = None if vectors is None else vectors.shape
            raise IndexLoadError(
                f"{artifact.root / ITEM_VECTORS_FILE}: vectors {shape}, index holds "
                f"({meta.n}, {meta.d})"
            )
        if not isinstance(item_ids, list) or len(item_ids) != meta.n:
            raise IndexLoadError(f"{artifact.root / ID_MAP_FILE}: expected {meta.n} item ids")
        return cls(index, [str(i) for i in item_ids], vectors, meta=meta, use_gpu=use_gpu)

    @property
    def n(self) -> int:
        return int(self.cpu_index.ntotal)

    @property
    def on_gpu(self) -> bool:
        return self.gpu_index is not None

    def search(
        self,
        queries: np.ndarray,
        k: int,
        exclude: Sequence[set[int] | np.ndarray | Sequence[int]] | None = None,
        params: SearchParams | None = None,
    ) -> SearchResult:
        """Top-``k`` rows per query by inner product, never returning an excluded row.

        ``queries`` (B, d) float32; ``exclude[b]`` holds row indices (0..N-1; others ignored).
        """
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.cpu_index.d:
            raise ValueError(f"queries must be (B, {self.cpu_index.d}), got {queries.shape}")
        if k < 0:
            raise ValueError(f"k must be >= 0, got {k}")
        b, n = len(queries), self.n
        if exclude is not None and len(exclude) != b:
            raise ValueError(f"{len(exclude)} exclusion sets for {b} queries")
        excl = [_rows(e, n) for e in exclude] if exclude is not None else [_EMPTY] * b
        want = np.array([min(k, n - e.size) for e in excl], dtype=np.int64)  # (B,)
        exhausted = want < k

        rows: list[np.ndarray] = [_EMPTY] * b
        scores: list[np.ndarray] = [_EMPTY_F] * b
        todo = np.flatnonzero(want > 0)
        fetch = min(n, k + max((excl[i].size for i in todo), default=0))
        for _attempt in range(2):
            if todo.size == 0:
                break
            s, r = self._search(queries[todo], fetch, params)  # (T, fetch)
            short = []
            for j, i in enumerate(todo):
                keep = r[j] >= 0
                if excl[i].size:
                    keep &= ~np.isin(r[j], excl[i], assume_unique=False)
                if keep.sum() >= want[i]:
                    rows[i], scores[i] = r[j][keep][: want[i]], s[j][keep][: want[i]]
                else:
                    short.append(i)
            todo = np.asarray(short, dtype=np.int64)
            if fetch == n:
                break
            fetch = min(n, fetch * RETRY_GROWTH)
        for i in todo:  # still short: exact search over the rows this query may return
            rows[i], scores[i] = self._exact_excluding(queries[i], want[i], excl[i])
        ids = [self.item_ids[r].tolist() for r in rows]
        return SearchResult(rows=rows, scores=scores, ids=ids, exhausted=exhausted)

    def _search(
        self, queries: np.ndarray, k: int, params: SearchParams | None
    ) -> tuple[np.ndarray, np.ndarray]:
        fp = self._faiss_params(params)
        nprobe = fp.nprobe if isinstance(fp, faiss.SearchParametersIVF) else 0
        use_gpu = self.gpu_index is not None and max(k, nprobe) <= GPU_MAX_K
        index = self.gpu_index if use_gpu else self.cpu_index
        if fp is None:
            return index.search(queries, k)
        return index.search(queries, k, params=fp)

    def _faiss_params(self, params: SearchParams | None) -> Any:
        # Passed per call so the shared index's own nprobe / efSearch never change.
        params = params or SearchParams()
        if self.kind is IndexKind.IVF:
            return faiss.SearchParametersIVF(nprobe=params.nprobe or self.meta.nprobe or 1)
        if self.kind is IndexKind.HNSW:
            return faiss.SearchParametersHNSW(efSearch=params.ef_search or self.meta.ef_search)
        return None

    def _exact_excluding(
        self, query: np.ndarray, k: int, excl: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        allowed = np.setdiff1d(np.arange(self.n, dtype=np.int64), excl, assume_unique=True)
        r, s = exact_search(self.vectors[allowed], query[None, :], k)
        return allowed[r[0]], s[0]


def exact_rows_excluding(
    vectors: np.ndarray, queries: np.ndarray, k: int, exclude: Sequence[Any]
) -> list[np.ndarray]:
    """Reference for tests: exact top-k rows per query with ``exclude[b]`` removed."""
    out = []
    for q, e in zip(queries, exclude, strict=True):
        allowed = np.setdiff1d(np.arange(len(vectors)), _rows(e, len(vectors)))
        r, _ = exact_search(vectors[allowed], q[None, :], k)
        out.append(allowed[r[0]])
    return out


def report(
    index: ItemIndex,
    vectors: np.ndarray,
    queries: np.ndarray,
    k: int = 100,
    *,
    batch_sizes: Sequence[int] = (1, 64),
    params: SearchParams | None = None,
    exact_rows: np.ndarray | None = None,
) -> dict[str, Any]:
    """Recall@k of ``index`` against exact search, and queries per second per batch size.

    ``exact_rows`` (B, >=k) is the ground truth when already computed (else numpy brute
    force over ``vectors``). A warm-up batch is run first and excluded from the timings.
    """
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    k = min(k, index.n)
    exact = exact_rows if exact_rows is not None else exact_search(vectors, queries, k)[0]
    approx = index.search(queries, k, params=params).rows
    recall = recall_at_k(np.stack(approx), exact, k)
    qps = {}
    for bs in batch_sizes:
        index.search(queries[:bs], k, params=params)  # warm-up
        start = time.perf_counter()
        for s in range(0, len(queries), bs):
            index.search(queries[s : s + bs], k, params=params)
        qps[str(bs)] = len(queries) / (time.perf_counter() - start)
    return {
        "kind": index.kind.value,
        "n": index.n,
        "d": int(index.cpu_index.d),
        "k": k,
        "nprobe": (params.nprobe if params and params.nprobe else index.meta.nprobe),
        "ef_search": (params.ef_search if params and params.ef_search else index.meta.ef_search),
        "recall": recall,
        "qps": qps,
        "on_gpu": index.on_gpu,
        "index_bytes": index.meta.bytes,
    }


# --- helpers -------------------------------------------------------------------------------------

_EMPTY = np.empty(0, dtype=np.int64)
_EMPTY_F = np.empty(0, dtype=np.float32)


def _rows(exclude: Any, n: int) -> np.ndarray:
    """Exclusion set → sorted unique int64 rows inside [0, n)."""
    if isinstance(exclude, set | frozenset):
        exclude = list(exclude)
    e = np.unique(np.asarray(exclude, dtype=np.int64).reshape(-1))
    return e[(e >= 0) & (e < n)]


def _to_gpu(index: faiss.Index, use_gpu: bool | None) -> tuple[Any, faiss.Index | None]:
    """(resources, GPU copy) or (None, None); ``use_gpu=None`` means "when available"."""
    n_gpus = faiss.get_num_gpus()
    available = n_gpus > 0 and hasattr(faiss, "StandardGpuResources")
    if use_gpu is False or not available:
        log.info(
            "item index on CPU (gpus=%d, gpu build=%s, requested=%s)",
            n_gpus,
            hasattr(faiss, "StandardGpuResources"),
            use_gpu,
        )
        if use_gpu:
            raise RuntimeError("use_gpu=True but FAISS sees no GPU")
        return None, None
    res = faiss.StandardGpuResources()
    try:
        gpu_index = faiss.index_cpu_to_gpu(res, 0, index)
    except RuntimeError as e:  # e.g. HNSW has no GPU implementation
        if use_gpu:
            raise
        log.info("item index stays on CPU: FAISS could not move it to GPU 0 (%s)", e)
        return None, None
    log.info("item index on GPU 0 (CPU copy kept for k > %d)", GPU_MAX_K)
    return res, gpu_index
