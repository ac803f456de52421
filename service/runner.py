"""The one place that owns tensors, the torch device and FAISS: generations and the runner.

A *generation* is everything one model version serves with — weights, FAISS index, id map and
the feature rules from its training config — loaded and checksum-verified as a unit, so a
reload swaps all of it or nothing. The `Runner` executes batches against a generation on a
single worker thread (the caller's executor): torch and FAISS are never touched from the event
loop, and never from two threads at once (a FAISS GPU index must not be).

The runner speaks in plain values: `KVState` / `SessionRecord` in, item ids and new `KVState`
out. It knows nothing of Redis or HTTP.

Static shapes. A batch of B users is padded to the next bucket (powers of two up to
``max_batch``) with empty users, and every bucket is run once at warm-up, so the first real
request of each size pays no allocator or kernel-selection cost. The per-user caches are
right-padded to the model's window W, so every step sees (L, bucket, H, W, Dh) tensors.

Exactness. A rebuild reads the last ``n_layers · W`` sessions of the log (the model's
receptive field, see ``model_store/model.py``) plus one older session for the oldest one's
time gap, so a rebuilt cache equals the cache the incremental path would have built; the
parity tests in ``tests/test_service.py`` check both against a full recompute.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from index.build import IndexLoadError
from index.search import ItemIndex
from model_store.artifacts import ArtifactError
from model_store.features import NO_PREVIOUS, cap_events, session_gap
from model_store.model import KVCache, ModelConfig, SessionRec, Sessions, pad_tokens
from model_store.registry import Registry, RegistryError
from model_store.store import load_model
from service.state import KVState, SessionRecord

log = logging.getLogger(__name__)

DEFAULT_MAX_ITEMS = 50  # training's default cap on events per session token


class GenerationError(Exception):
    """A model version that cannot be served; the message says which file or rule failed."""


@dataclass(frozen=True)
class Generation:
    """One servable model version: model + index + id map, immutable once loaded."""

    version: str
    model: SessionRec
    index: ItemIndex
    item_rows: dict[str, int]  # external item id → model item index (1..N); FAISS row = idx-1
    max_items: int  # events per session token, as trained
    device: torch.device
    info: dict = field(default_factory=dict)  # what GET /model shows

    @property
    def config(self) -> ModelConfig:
        return self.model.config

    @property
    def history(self) -> int:
        """Sessions a rebuild reads: the model's receptive field, n_layers · W."""
        return self.config.n_layers * self.config.window

    def fits(self, kv: KVState) -> bool:
        """The cached K/V has this model's (L, H, n ≤ W, Dh) shape."""
        c = self.config
        L, H, n, Dh = kv.k.shape
        return (L, H, Dh) == (c.n_layers, c.n_heads, c.head_dim) and 0 < n <= c.window

    def rows(self, items: Sequence[str]) -> list[int]:
        """Model item indices of the known ``items`` (unknown ones are dropped)."""
        return [r for r in (self.item_rows.get(i) for i in items) if r is not None]

    def unknown(self, items: Sequence[str]) -> list[str]:
        """Items this generation's catalogue does not hold, deduplicated, in order."""
        return list(dict.fromkeys(i for i in items if i not in self.item_rows))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise GenerationError("device=cuda but torch sees no CUDA device")
    return torch.device(name)


def load_generation(
    registry_root: Path, ref: str, *, device: str = "auto", log_sessions: int | None = None
) -> Generation:
    """Resolve ``ref``, verify every checksum, and load model + index + id map as one unit.

    ``log_sessions`` (the raw log size the state store keeps) must cover the model's receptive
    field plus one session, or rebuilt caches would differ from incremental ones.
    """
    dev = resolve_device(device)
    try:
        registry = Registry(Path(registry_root))
        version = registry.resolve(ref)
        artifact = registry.open(version, verify=True)
        loaded = load_model(artifact, device=dev)
        index = ItemIndex.from_artifact(artifact, use_gpu=None if dev.type == "cuda" else False)
    except (RegistryError, ArtifactError, IndexLoadError, FileNotFoundError) as exc:
        raise GenerationError(f"cannot load model {ref!r} from {registry_root}: {exc}") from exc
    if loaded.kind != "sessionrec":
        raise GenerationError(f"model {version} is a {loaded.kind!r} model; serving needs one")
    model: SessionRec = loaded.model
    needed = model.config.n_layers * model.config.window + 1
    if log_sessions is not None and log_sessions < needed:
        raise GenerationError(
            f"model {version} needs a raw log of {needed} sessions (n_layers·window + 1) for "
            f"exact rebuilds; the service keeps {log_sessions} (raise SESSIONREC_LOG_SESSIONS)"
        )
    if index.n != model.config.n_items or list(index.item_ids) != loaded.item_ids:
        raise GenerationError(f"model {version}: index and id map disagree")
    max_items = int(loaded.config.get("train", {}).get("max_items") or DEFAULT_MAX_ITEMS)
    info = {
        "version": version,
        "kind": loaded.kind,
        "n_items": model.config.n_items,
        "model": model.config.to_dict(),
        "max_items": max_items,
        "index": {"kind": index.kind.value, "on_gpu": index.on_gpu, **index.meta.__dict__},
        "device": str(dev),
        "metrics": {k: v for k, v in loaded.metrics.items() if k in ("val", "test")},
        "loaded_at": time.time(),
    }
    item_rows = {item: i + 1 for i, item in enumerate(loaded.item_ids)}
    return Generation(version, model, index, item_rows, max_items, dev, info)


# ----------------------------------------------------------------------------- jobs


@dataclass(frozen=True)
class RecommendJob:
    """One recommendation in compute form. Exactly one of ``kv`` / ``sessions`` drives the
    history: a usable cache, or the raw log to rebuild from; neither = cold start."""

    now: int  # request time, Unix seconds
    k: int
    kv: KVState | None = None
    sessions: tuple[SessionRecord, ...] | None = None
    log_seq: int = 0  # the log sequence ``sessions`` reflect (tags a rebuilt cache)
    context_items: tuple[str, ...] = ()
    context_labels: tuple[int, ...] = ()
    exclude: tuple[str, ...] = ()


@dataclass(frozen=True)
class Recommendation:
    item_ids: list[str]
    scores: list[float]
    exhausted: bool  # fewer than k items were possible after exclusions
    rebuilt: KVState | None  # a cache rebuilt from the log, to be written back


@dataclass(frozen=True)
class AppendJob:
    """A closed session appended to a cache that reflects the log just before it."""

    kv: KVState
    record: SessionRecord
    log_seq: int  # the log sequence after the append


class Runner:
    """Runs batches against a generation. Call every method from one worker thread."""

    def __init__(self, max_batch: int) -> None:
        self.buckets = _buckets(max_batch)
        # Host staging buffers of the batch cache, one per (shape, bucket), reused every
        # batch: no per-batch allocation on the hot path. Stale values beyond a user's length
        # are never read (the attention mask excludes them) and are finite (earlier caches).
        self._staging: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}

    # ---- the serving step

    @torch.inference_mode()
    def recommend(self, gen: Generation, jobs: Sequence[RecommendJob]) -> list[Recommendation]:
        """Interest vectors for a batch (cached, rebuilt or cold), then top-k from the index."""
        rebuild_at = [i for i, j in enumerate(jobs) if j.kv is None and j.sessions]
        rebuilt = self.rebuild(
            gen, [jobs[i].sessions for i in rebuild_at], [jobs[i].log_seq for i in rebuild_at]
        )
        states: list[KVState | None] = [j.kv for j in jobs]
        for i, state in zip(rebuild_at, rebuilt, strict=True):
            states[i] = state
        vectors = self.interest(gen, jobs, states)  # (B, d) numpy
        k_max = max(j.k for j in jobs)
        exclude = [gen.rows(j.exclude) for j in jobs]
        result = gen.index.search(
            vectors, k_max, [np.asarray(e, dtype=np.int64) - 1 for e in exclude]
        )
        out, fresh = [], set(rebuild_at)
        for i, job in enumerate(jobs):
            n = min(job.k, len(result.ids[i]))
            out.append(
                Recommendation(
                    item_ids=result.ids[i][:n],
                    scores=result.scores[i][:n].astype(float).tolist(),
                    exhausted=n < job.k,
                    rebuilt=states[i] if i in fresh else None,
                )
            )
        return out

    @torch.inference_mode()
    def interest(
        self, gen: Generation, jobs: Sequence[RecommendJob], states: Sequence[KVState | None]
    ) -> np.ndarray:
        """User-interest vectors (B, d): one query step per user against its cache."""
        model, dev = gen.model, gen.device
        B = len(jobs)
        bucket = self._bucket(B)
        cache = self._stack(gen.config, states, bucket, dev)
        gap = torch.full((bucket,), float(NO_PREVIOUS))
        start = torch.zeros(bucket, dtype=torch.long)
        ctx = _Flat()
        for b, (job, state) in enumerate(zip(jobs, states, strict=True)):
            if state is not None:
                gap[b] = session_gap(job.now, state.last_ended_at)
            start[b] = job.now
            rows = [gen.item_rows.get(i) for i in job.context_items]
            ctx.add(
                b,
                [r for r in rows if r],
                [lab for r, lab in zip(rows, job.context_labels, strict=True) if r],
            )
        queries = model.encode_queries(gap.to(dev), start.to(dev), ctx.sessions(bucket, dev))
        interest, _ = model.step(queries, cache, append=False)  # (bucket, d)
        return interest[:B].float().cpu().numpy()

    # ---- cache maintenance

    @torch.inference_mode()
    def rebuild(
        self,
        gen: Generation,
        logs: Sequence[Sequence[SessionRecord] | None],
        log_seqs: Sequence[int],
    ) -> list[KVState]:
        """Caches rebuilt from raw logs (oldest → newest): prefill over the receptive field."""
        if not logs:
            return []
        model, dev = gen.model, gen.device
        flat, lengths, last_end = _Flat(), [], []
        gaps, starts = [], []
        n = 0
        for sessions in logs:
            sessions = list(sessions or ())
            window = sessions[-gen.history :]
            previous = sessions[-gen.history - 1] if len(sessions) > gen.history else None
            for s in window:
                items, labels = _session_rows(gen, s)
                flat.add(n, items, labels)
                gaps.append(session_gap(s.started_at, previous.ended_at if previous else None))
                starts.append(s.started_at)
                previous = s
                n += 1
            lengths.append(len(window))
            last_end.append(window[-1].ended_at if window else 0)
        tokens = model.encode_sessions(
            flat.sessions(n, dev, gap=torch.tensor(gaps), start=torch.tensor(starts))
        )
        lengths_t = torch.tensor(lengths, dtype=torch.long, device=dev)
        cache = _to_cpu(model.prefill(pad_tokens(tokens, lengths_t), lengths_t))
        return [
            _state(gen, cache, b, seq, end)
            for b, (seq, end) in enumerate(zip(log_seqs, last_end, strict=True))
        ]

    @torch.inference_mode()
    def append(self, gen: Generation, jobs: Sequence[AppendJob]) -> list[KVState]:
        """Each closed session's token run through the layers once; its K/V appended."""
        if not jobs:
            return []
        model, dev = gen.model, gen.device
        flat, gaps, starts = _Flat(), [], []
        for b, job in enumerate(jobs):
            flat.add(b, *_session_rows(gen, job.record))
            gaps.append(session_gap(job.record.started_at, job.kv.last_ended_at))
            starts.append(job.record.started_at)
        tokens = model.encode_sessions(
            flat.sessions(len(jobs), dev, gap=torch.tensor(gaps), start=torch.tensor(starts))
        )
        cache = self._stack(gen.config, [j.kv for j in jobs], len(jobs), dev)
        _, cache = model.step(tokens, cache, append=True)
        cache = _to_cpu(cache)
        return [
            _state(gen, cache, b, job.log_seq, job.record.ended_at) for b, job in enumerate(jobs)
        ]

    # ---- warm-up

    def warm(self, gen: Generation) -> None:
        """Run every bucket and both cache paths once, before serving traffic."""
        for bucket in self.buckets:
            self.warm_bucket(gen, bucket)
        self.warm_state_paths(gen)

    def warm_bucket(self, gen: Generation, bucket: int) -> None:
        """One recommend step at ``bucket`` users (full caches, context, exclusions)."""
        some_items = list(gen.item_rows)[: min(4, gen.config.n_items)]
        kv = _state_full(gen)
        job = RecommendJob(
            now=int(time.time()),
            k=min(50, gen.config.n_items),
            kv=kv,
            context_items=tuple(some_items[:2]),
            context_labels=(1, 0)[: len(some_items[:2])],
            exclude=tuple(some_items[2:]),
        )
        self.recommend(gen, [job] * bucket)
        if gen.device.type == "cuda":
            torch.cuda.synchronize(gen.device)

    def warm_state_paths(self, gen: Generation) -> None:
        """A rebuild and an append, once each."""
        some_items = list(gen.item_rows)[: min(4, gen.config.n_items)]
        record = SessionRecord("warm", 0, 1, tuple(some_items), (1,) * len(some_items))
        self.rebuild(gen, [[record]], [1])
        self.append(gen, [AppendJob(_state_full(gen), record, 1)])
        if gen.device.type == "cuda":
            torch.cuda.synchronize(gen.device)

    def _stack(
        self,
        config: ModelConfig,
        states: Sequence[KVState | None],
        bucket: int,
        dev: torch.device,
    ) -> KVCache:
        """Per-user cached K/V (None = empty) → one right-padded (L, bucket, H, W, Dh) cache."""
        shape = (config.n_layers, bucket, config.n_heads, config.window, config.head_dim)
        if shape not in self._staging:
            self._staging[shape] = (np.zeros(shape, np.float32), np.zeros(shape, np.float32))
        k, v = self._staging[shape]
        lengths = np.zeros(bucket, dtype=np.int64)
        for b, state in enumerate(states):
            if state is not None:
                n = state.k.shape[2]
                k[:, b, :, :n] = state.k
                v[:, b, :, :n] = state.v
                lengths[b] = n
        return KVCache(
            torch.from_numpy(k).to(dev),
            torch.from_numpy(v).to(dev),
            torch.from_numpy(lengths).to(dev),
        )

    def _bucket(self, n: int) -> int:
        for b in self.buckets:
            if b >= n:
                return b
        return n  # larger than max_batch (direct callers): exact size


# ----------------------------------------------------------------------------- helpers


def _buckets(max_batch: int) -> list[int]:
    out, b = [], 1
    while b < max_batch:
        out.append(b)
        b *= 2
    return [*out, max_batch]


def _session_rows(gen: Generation, s: SessionRecord) -> tuple[list[int], list[int]]:
    """A logged session → (model item indices, labels), capped as in training."""
    pairs = [(gen.item_rows.get(i), lab) for i, lab in zip(s.items, s.labels, strict=True)]
    items = np.array([r for r, _ in pairs if r is not None], dtype=np.int64)
    labels = np.array([lab for r, lab in pairs if r is not None], dtype=np.int64)
    items, labels = cap_events(items, labels, gen.max_items)
    return items.tolist(), labels.tolist()


class _Flat:
    """Accumulates per-segment (items, labels) into a flat `Sessions`."""

    def __init__(self) -> None:
        self.items: list[int] = []
        self.labels: list[int] = []
        self.segment: list[int] = []

    def add(self, seg: int, items: Sequence[int], labels: Sequence[int]) -> None:
        self.items.extend(items)
        self.labels.extend(labels)
        self.segment.extend([seg] * len(items))

    def sessions(self, n: int, dev: torch.device, *, gap=None, start=None) -> Sessions:
        def long(x):
            return torch.tensor(x, dtype=torch.long, device=dev)

        return Sessions(
            items=long(self.items),
            labels=long(self.labels),
            segment=long(self.segment),
            gap=(gap if gap is not None else torch.full((n,), -1.0)).float().to(dev),
            start=(start if start is not None else torch.zeros(n)).long().to(dev),
            n=n,
        )


def _state(gen: Generation, cache: KVCache, b: int, log_seq: int, last_ended_at: int) -> KVState:
    k, v = cache.user(b)  # (L, H, n, Dh); the cache is on the CPU already (_to_cpu)
    return KVState(
        gen.version,
        int(log_seq),
        int(last_ended_at),
        np.ascontiguousarray(k.float().cpu().numpy()),
        np.ascontiguousarray(v.float().cpu().numpy()),
    )


def _to_cpu(cache: KVCache) -> KVCache:
    """One device → host copy per batch (not one sync per user)."""
    return KVCache(cache.k.float().cpu(), cache.v.float().cpu(), cache.lengths.cpu())


def _state_full(gen: Generation) -> KVState:
    cfg = gen.config
    shape = (cfg.n_layers, cfg.n_heads, cfg.window, cfg.head_dim)
    rng = np.random.default_rng(0)
    k = rng.standard_normal(shape).astype(np.float32)
    return KVState(gen.version, 0, 0, k, k.copy())
