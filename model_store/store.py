"""Save and load trained models as registry artifacts.

One artifact per model version, every file listed with its sha256 in the manifest and verified
before anything is read:

============================  ==============================================================
``config.json``               kind, model architecture, training config, dataset summary
``model.safetensors``         weights (the item-category table travels as a buffer)
``item_vectors.safetensors``  ``vectors``: (N, d) float32 L2-normalised; row i ↔ item_ids[i]
``id_map.json``               ``{"items": [external item id of row i, ...]}``
``metrics.json``              validation/test metrics and the training history
============================  ==============================================================

Weights load with ``safetensors`` (no pickle) and a strict ``load_state_dict``; shapes of the
vectors and the id map are checked against the config, so a mismatched file is refused with a
message that names it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load as load_numpy
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from model_store.artifacts import Artifact, ArtifactError
from model_store.model import ModelConfig, SessionRec
from model_store.registry import Registry
from model_store.sasrec import SASRec, SASRecConfig

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
ITEM_VECTORS = "item_vectors.safetensors"
ID_MAP = "id_map.json"
METRICS = "metrics.json"
REQUIRED = (CONFIG, WEIGHTS, ITEM_VECTORS, ID_MAP, METRICS)

_ARCHITECTURES = {"sessionrec": (SessionRec, ModelConfig), "sasrec": (SASRec, SASRecConfig)}


@dataclass(frozen=True)
class LoadedModel:
    version: str
    kind: str
    model: torch.nn.Module  # eval mode, on the requested device
    config: dict  # the whole config.json
    item_ids: list[str]  # external id of item index i+1
    item_vectors: torch.Tensor  # (N, d) float32, CPU
    metrics: dict


def save_model(
    registry: Registry,
    model: torch.nn.Module,
    *,
    kind: str,
    train_config: dict,
    data: dict,
    item_ids: list[str],
    metrics: dict,
    promote: bool = False,
) -> str:
    """Write one model version into the registry; returns the new version name."""
    if kind not in _ARCHITECTURES:
        raise ValueError(f"unknown model kind {kind!r}; expected one of {sorted(_ARCHITECTURES)}")
    if len(item_ids) != model.config.n_items:
        raise ValueError(f"{len(item_ids)} item ids for a model of {model.config.n_items} items")
    model.eval()
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with torch.inference_mode():
        vectors = model.item_vectors().detach().float().cpu().contiguous()
    version = registry.new_version(kind)
    config = {"kind": kind, "model": model.config.to_dict(), "train": train_config, "data": data}
    with registry.writer(version, kind=kind, extra={"n_items": len(item_ids)}) as w:
        w.write_json(CONFIG, config)
        w.write_bytes(WEIGHTS, save_safetensors(state, metadata={"kind": kind}))
        w.write_bytes(ITEM_VECTORS, save_safetensors({"vectors": vectors}))
        w.write_json(ID_MAP, {"items": list(item_ids)})
        w.write_json(METRICS, metrics)
    if promote:
        registry.promote(version)
    return version


def load_model(artifact: Artifact, *, device: str | torch.device = "cpu") -> LoadedModel:
    """Rebuild a model from a verified artifact (see `Registry.open`)."""
    for name in REQUIRED:
        artifact.path(name)  # raises ArtifactError naming the file when it is not listed
    config = artifact.read_json(CONFIG)
    kind = config.get("kind")
    if kind not in _ARCHITECTURES:
        raise ArtifactError(f"{artifact.root / CONFIG}: unknown model kind {kind!r}")
    module_cls, config_cls = _ARCHITECTURES[kind]
    try:
        model_config = config_cls.from_dict(config["model"])
        model = module_cls(model_config)
        state = load_safetensors(artifact.read_bytes(WEIGHTS))
        model.load_state_dict(state, strict=True)
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise ArtifactError(f"{artifact.root / WEIGHTS}: does not match {CONFIG}: {exc}") from exc
    vectors = load_safetensors(artifact.read_bytes(ITEM_VECTORS)).get("vectors")
    expected = (model_config.n_items, model_config.dim)
    if vectors is None or tuple(vectors.shape) != expected:
        shape = None if vectors is None else tuple(vectors.shape)
        raise ArtifactError(f"{artifact.root / ITEM_VECTORS}: shape {shape}, expected {expected}")
    item_ids = artifact.read_json(ID_MAP).get("items")
    if not isinstance(item_ids, list) or len(item_ids) != model_config.n_items:
        raise ArtifactError(f"{artifact.root / ID_MAP}: expected {model_config.n_items} item ids")
    return LoadedModel(
        version=artifact.version,
        kind=kind,
        model=model.to(device).eval(),
        config=config,
        item_ids=[str(i) for i in item_ids],
        item_vectors=vectors.float(),
        metrics=artifact.read_json(METRICS),
    )


def read_item_vectors(artifact: Artifact) -> np.ndarray:
    """The (N, d) float32 item vectors of a model artifact, checksum-verified, as numpy."""
    vectors = load_numpy(artifact.read_bytes(ITEM_VECTORS)).get("vectors")
    if vectors is None or vectors.ndim != 2:
        raise ArtifactError(f"{artifact.root / ITEM_VECTORS}: no (N, d) 'vectors' tensor")
    return vectors


def open_model(registry_root: Path, ref: str = "current", *, device="cpu") -> LoadedModel:
    """Resolve ``ref`` in the registry, verify every checksum, and load the model."""
    return load_model(Registry(Path(registry_root)).open(ref, verify=True), device=device)
