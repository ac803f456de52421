"""One-shot bootstrap job of docker-compose: the demo's data, model, index and Redis state.

    synthetic data → train SessionRec and promote it → FAISS index → backfill every user

Each step runs the ``sessionrec`` command line and is skipped when its result already exists,
so re-running the job (every ``docker-compose up`` starts it again) costs seconds and never
replaces a model:

* data:     skipped when ``$BOOTSTRAP_DATA/meta.json`` exists (``data prepare`` writes it last);
* training: skipped when the registry has a ``CURRENT`` model that opens and verifies; a
            ``CURRENT`` that fails verification stops the job (it is an operator's model:
            nothing overwrites it silently);
* index:    built only when the current model has none;
* backfill: always runs; it is idempotent (sessions already in Redis are skipped).

Configuration (environment):

| variable               | default                    |                                    |
|------------------------|----------------------------|------------------------------------|
| ``SESSIONREC_REGISTRY``  | ``/data/artifacts``        | model registry (shared with ``api``) |
| ``SESSIONREC_REDIS_URL`` | unset (embedded Redis)     | Redis to backfill                  |
| ``SESSIONREC_DEVICE``    | ``auto``                   | torch device for training          |
| ``BOOTSTRAP_DATA``       | ``/data/datasets/synthetic`` | prepared dataset folder          |
| ``BOOTSTRAP_USERS``      | ``2000``                   | synthetic users                    |
| ``BOOTSTRAP_ITEMS``      | ``2000``                   | synthetic catalogue size           |
| ``BOOTSTRAP_EPOCHS``     | ``8``                      | training epochs                    |
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from model_store.artifacts import ArtifactError
from model_store.registry import Registry, RegistryError

INDEX_FILE = "item_index.faiss"  # index.build.INDEX_FILE, without importing FAISS


def log(message: str) -> None:
    print(f"[bootstrap {time.strftime('%H:%M:%S')}] {message}", flush=True)


def env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SystemExit(f"bootstrap: {name} must be an integer, got {raw!r}") from None
    if value < 1:
        raise SystemExit(f"bootstrap: {name} must be ≥ 1, got {value}")
    return value


def sessionrec(*args: str | Path | int) -> None:
    exe = shutil.which("sessionrec")
    cmd = [exe] if exe else [sys.executable, "-m", "sessionrec.cli"]
    cmd += [str(a) for a in args]
    log("$ " + " ".join(cmd))
    started = time.monotonic()
    result = subprocess.run(cmd, check=False)
    if result.returncode != 0:
        raise SystemExit(f"bootstrap: step failed with exit code {result.returncode}")
    log(f"  done in {time.monotonic() - started:.0f}s")


def current_model(registry: Registry) -> str | None:
    """The verified CURRENT version, None when nothing is promoted; exits on a damaged one."""
    try:
        if registry.current() is None:
            return None
        return registry.open("current", verify=True).version
    except (RegistryError, ArtifactError) as exc:
        raise SystemExit(
            f"bootstrap: the registry's CURRENT model is unusable ({exc}); fix or re-promote it "
            f"(`sessionrec models promote VERSION --registry {registry.root}`), or remove "
            "CURRENT to have a new demo model trained"
        ) from None


def main() -> int:
    registry_dir = Path(os.environ.get("SESSIONREC_REGISTRY") or "/data/artifacts")
    data = Path(os.environ.get("BOOTSTRAP_DATA") or "/data/datasets/synthetic")
    redis_url = os.environ.get("SESSIONREC_REDIS_URL") or None
    device = os.environ.get("SESSIONREC_DEVICE") or "auto"
    users = env_int("BOOTSTRAP_USERS", 2000)
    items = env_int("BOOTSTRAP_ITEMS", 2000)
    epochs = env_int("BOOTSTRAP_EPOCHS", 8)

    if (data / "meta.json").is_file():
        log(f"data: {data} already prepared, skipped")
    else:
        sessionrec(
            "data", "prepare", "--source", "synthetic", "--out", data,
            "--users", users, "--items", items,
        )  # fmt: skip

    registry = Registry(registry_dir)
    version = current_model(registry)
    if version is not None:
        log(f"model: CURRENT is {version}, training skipped")
    else:
        sessionrec(
            "train", "--data", data, "--registry", registry_dir, "--promote",
            "--epochs", epochs, "--device", device,
        )  # fmt: skip
        version = current_model(registry)
        if version is None:
            raise SystemExit("bootstrap: training finished but nothing was promoted")

    if (registry.path(version) / INDEX_FILE).is_file():
        log(f"index: {version} already has {INDEX_FILE}, skipped")
    else:
        sessionrec("index", "build", "--registry", registry_dir, "--model", version)

    # The Redis comes from SESSIONREC_REDIS_URL (unset: the embedded one under the data dir).
    sessionrec("backfill", "--data", data, "--registry", registry_dir)
    log(f"ready: {version} in {registry_dir}, users backfilled into {redis_url or 'embedded'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
