"""FAISS index layer: exactness, tuned recall, exclusion contract, and refusing bad files."""

from __future__ import annotations

import json

import faiss
import numpy as np
import pytest
from safetensors.numpy import save as save_safetensors

from index import (
    INDEX_FILE,
    IndexConfig,
    IndexKind,
    IndexLoadError,
    ItemIndex,
    SearchParams,
    add_index_to_artifact,
    build_index,
    exact_search,
    load_index,
    load_index_from_artifact,
    recall_at_k,
    report,
    save_index,
)
from index.build import resolve_kind
from index.search import exact_rows_excluding
from model_store.artifacts import ArtifactError, ArtifactWriter, open_artifact

N, D, K = 2_000, 16, 100


def clustered(n: int, d: int, *, clusters: int, seed: int, sigma: float = 0.3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, d))
    x = centres[rng.integers(clusters, size=n)] + sigma * rng.standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def mixture() -> np.ndarray:
    return clustered(N + 64, D, clusters=20, seed=0)


@pytest.fixture(scope="module")
def vectors(mixture: np.ndarray) -> np.ndarray:
    return mixture[:N].copy()


@pytest.fixture(scope="module")
def queries(mixture: np.ndarray) -> np.ndarray:
    return mixture[N:].copy()  # held out: same mixture, not the build's tuning queries


@pytest.fixture(scope="module")
def ids() -> list[str]:
    return [f"item-{i}" for i in range(N)]


@pytest.fixture(scope="module")
def flat(vectors: np.ndarray, ids: list[str]) -> ItemIndex:
    return ItemIndex(build_index(vectors, IndexConfig(kind=IndexKind.FLAT)), ids, vectors)


@pytest.fixture(scope="module")
def ivf(vectors: np.ndarray, ids: list[str]) -> ItemIndex:
    return ItemIndex(build_index(vectors, IndexConfig(kind=IndexKind.IVF, seed=0)), ids, vectors)


def test_auto_rule() -> None:
    assert resolve_kind(IndexKind.AUTO, 99_999) is IndexKind.FLAT
    assert resolve_kind(IndexKind.AUTO, 100_000) is IndexKind.IVF
    assert resolve_kind(IndexKind.HNSW, 10) is IndexKind.HNSW


def test_flat_equals_numpy_brute_force(flat: ItemIndex, vectors, queries, ids) -> None:
    res = flat.search(queries, K)
    scores = queries @ vectors.T
    for b in range(len(queries)):
        expected = np.argsort(-scores[b], kind="stable")[:K]
        np.testing.assert_array_equal(res.rows[b], expected)
        np.testing.assert_allclose(res.scores[b], scores[b, expected], rtol=1e-5, atol=1e-6)
        assert res.ids[b] == [ids[r] for r in expected]
    assert not res.exhausted.any()


def test_ivf_tuned_nprobe_reaches_target_on_held_out_queries(ivf: ItemIndex, vectors, queries):
    nprobe = ivf.meta.nprobe
    assert 1 <= nprobe <= ivf.meta.nlist
    exact, _ = exact_search(vectors, queries, K)
    got = np.stack(ivf.search(queries, K).rows)
    assert recall_at_k(got, exact, K) >= 0.95
    if nprobe > 1:  # tuning picked the smallest power of two, so half falls short on its sample
        # (raw FAISS here: ItemIndex would fill short IVF answers with its exact fallback)
        raw = ivf.cpu_index.search(queries, K, params=faiss.SearchParametersIVF(nprobe=nprobe))
        half = ivf.cpu_index.search(
            queries, K, params=faiss.SearchParametersIVF(nprobe=nprobe // 2)
        )
        assert recall_at_k(half[1], exact, K) < recall_at_k(raw[1], exact, K)


def test_hnsw_recall(vectors, queries, ids) -> None:
    config = IndexConfig(kind=IndexKind.HNSW, hnsw_m=16, ef_construction=80, ef_search=128)
    hnsw = ItemIndex(build_index(vectors, config), ids, vectors)
    exact, _ = exact_search(vectors, queries, K)
    assert recall_at_k(np.stack(hnsw.search(queries, K).rows), exact, K) >= 0.9


@pytest.mark.parametrize("which", ["flat", "ivf"])
def test_exclusion_never_returns_excluded_and_returns_exactly_k(which, request, queries):
    index: ItemIndex = request.getfixturevalue(which)
    rng = np.random.default_rng(2)
    top = np.stack(index.search(queries, 50).rows)
    # exclude each query's own best hits (the hard case) plus random rows, as sets and arrays
    exclude = [
        set(top[b, : 5 * b % 50].tolist()) | set(rng.integers(N, size=30).tolist())
        if b % 2
        else np.concatenate([top[b, :40], rng.integers(N, size=10)])
        for b in range(len(queries))
    ]
    res = index.search(queries, 20, exclude=exclude)
    for b, rows in enumerate(res.rows):
        assert len(rows) == 20 and len(set(rows.tolist())) == 20
        assert not set(rows.tolist()) & set(np.asarray(list(exclude[b])).tolist())
        assert np.all(np.diff(res.scores[b]) <= 1e-6)
    assert not res.exhausted.any()
    if which == "flat":
        expected = exact_rows_excluding(index.vectors, queries, 20, exclude)
        for got, want in zip(res.rows, expected, strict=True):
            np.testing.assert_array_equal(got, want)


def test_ivf_short_results_fall_back_to_exact(vectors, ids, queries) -> None:
    # nprobe=1 over many small lists cannot produce 500 candidates: -1 padding must be filled
    index = ItemIndex(
        build_index(vectors, IndexConfig(kind=IndexKind.IVF, nlist=50, nprobe=1)), ids, vectors
    )
    exclude = [np.arange(0, N, 3)] * 4
    res = index.search(queries[:4], 500, exclude=exclude)
    for b, rows in enumerate(res.rows):
        assert len(rows) == 500 and not np.isin(rows, exclude[b]).any()
        assert len(np.unique(rows)) == 500


def test_k_larger_than_catalogue_returns_all_non_excluded(flat: ItemIndex, ivf, queries) -> None:
    exclude = [set(range(0, N, 2)), set(), {N + 5, -1, 3}]  # out-of-range rows are ignored
    for index in (flat, ivf):
        res = index.search(queries[:3], N + 10, exclude=exclude)
        assert [len(r) for r in res.rows] == [N // 2, N, N - 1]
        assert set(res.rows[0].tolist()) == set(range(1, N, 2))
        assert set(res.rows[1].tolist()) == set(range(N))
        assert res.exhausted.tolist() == [True, True, True]


def test_empty_exclusion_equals_no_exclusion(flat: ItemIndex, queries) -> None:
    a = flat.search(queries, 10)
    b = flat.search(queries, 10, exclude=[set() for _ in queries])
    for x, y in zip(a.rows, b.rows, strict=True):
        np.testing.assert_array_equal(x, y)


def test_excluding_everything_gives_empty_exhausted(flat: ItemIndex, ivf, queries) -> None:
    for index in (flat, ivf):
        res = index.search(queries[:2], 10, exclude=[np.arange(N), set(range(N))])
        assert [len(r) for r in res.rows] == [0, 0] and res.ids == [[], []]
        assert res.exhausted.tolist() == [True, True]


def test_k_zero_and_empty_batch(flat: ItemIndex, queries) -> None:
    res = flat.search(queries[:2], 0)
    assert [len(r) for r in res.rows] == [0, 0] and not res.exhausted.any()
    assert flat.search(queries[:0], 5).rows == []


def test_per_call_params_do_not_touch_index_nprobe(ivf: ItemIndex, queries) -> None:
    before = ivf.cpu_index.nprobe
    ivf.search(queries, 10, params=SearchParams(nprobe=before + 3))
    assert ivf.cpu_index.nprobe == before == ivf.meta.nprobe


def test_save_load_round_trip(ivf: ItemIndex, vectors, ids, queries, tmp_path) -> None:
    meta = save_index(ivf.cpu_index, tmp_path / "items.faiss")
    sidecar = json.loads((tmp_path / "items.faiss.json").read_text())
    assert sidecar["kind"] == "ivf" and (sidecar["n"], sidecar["d"]) == (N, D)
    assert sidecar["nprobe"] == ivf.meta.nprobe and sidecar["faiss_version"] == faiss.__version__
    loaded, meta2 = load_index(tmp_path / "items.faiss")
    assert meta2 == meta
    again = ItemIndex(loaded, ids, vectors, meta=meta2)
    a, b = ivf.search(queries, K), again.search(queries, K)
    for x, y, sx, sy in zip(a.rows, b.rows, a.scores, b.scores, strict=True):
        np.testing.assert_array_equal(x, y)
        np.testing.assert_array_equal(sx, sy)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_damaged_file_is_refused(flat: ItemIndex, tmp_path, damage) -> None:
    path = tmp_path / "items.faiss"
    save_index(flat.cpu_index, path)
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(IndexLoadError, match="items.faiss") as info:
        load_index(path)
    assert ("size mismatch" if damage == "truncate" else "sha256 mismatch") in str(info.value)


def test_sidecar_shape_mismatch_is_refused(flat: ItemIndex, tmp_path) -> None:
    path = tmp_path / "items.faiss"
    save_index(flat.cpu_index, path)
    meta_path = tmp_path / "items.faiss.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "n": N + 1}))
    with pytest.raises(IndexLoadError, match=r"sidecar says \(2001, 16\)"):
        load_index(path)
    meta_path.write_text("{not json")
    with pytest.raises(IndexLoadError, match="items.faiss.json"):
        load_index(path)


def test_artifact_round_trip(ivf: ItemIndex, vectors, ids, queries, tmp_path) -> None:
    root = tmp_path / "v1"
    with ArtifactWriter(root, version="v1", kind="sessionrec") as w:
        w.write_json("id_map.json", {"items": ids})
    meta = add_index_to_artifact(root, ivf.cpu_index)
    artifact = open_artifact(root, require=[INDEX_FILE, "item_index.json"])
    assert artifact.manifest["files"][INDEX_FILE]["sha256"] == meta.sha256
    loaded, meta2 = load_index_from_artifact(artifact)
    assert meta2 == meta
    again = ItemIndex(loaded, artifact.read_json("id_map.json")["items"], vectors, meta=meta2)
    for x, y in zip(ivf.search(queries, K).rows, again.search(queries, K).rows, strict=True):
        np.testing.assert_array_equal(x, y)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v1"]  # temp dir cleaned up
    with pytest.raises(ArtifactError, match="already listed"):  # published files never change
        add_index_to_artifact(root, ivf.cpu_index)


def test_item_index_from_artifact(flat: ItemIndex, vectors, ids, queries, tmp_path) -> None:
    root = tmp_path / "v1"
    with ArtifactWriter(root, version="v1", kind="sessionrec") as w:
        w.write_json("id_map.json", {"items": ids})
        w.write_bytes("item_vectors.safetensors", save_safetensors({"vectors": vectors}))
    add_index_to_artifact(root, flat.cpu_index)
    loaded = ItemIndex.from_artifact(open_artifact(root), use_gpu=False)
    a, b = flat.search(queries, 5), loaded.search(queries, 5)
    assert a.ids == b.ids and loaded.kind is IndexKind.FLAT
    (root / INDEX_FILE).write_bytes((root / INDEX_FILE).read_bytes()[:-8])
    with pytest.raises(ArtifactError, match=INDEX_FILE):  # the manifest check catches it first
        ItemIndex.from_artifact(open_artifact(root, verify=False))


def test_report(flat: ItemIndex, vectors, queries) -> None:
    out = report(flat, vectors, queries[:8], k=10, batch_sizes=(1, 4))
    assert out["recall"] == 1.0 and set(out["qps"]) == {"1", "4"} and out["kind"] == "flat"


def test_cpu_when_no_gpu(flat: ItemIndex) -> None:
    if faiss.get_num_gpus() == 0:
        assert not flat.on_gpu
