# syntax=docker/dockerfile:1
#
# sessionrec: the HTTP service image, CPU (default) or GPU, chosen by one build argument.
#
#   docker build -t sessionrec:cpu .
#   docker build -t sessionrec:gpu --build-arg VARIANT=gpu .     # run with --gpus all
#   docker build -t sessionrec-loadtest:cpu --target loadtest .  # locust, for the load test
#
# Stages: base-cpu | base-gpu -> base (the chosen one + a non-root user) -> builder (a venv with
# everything installed, as root) -> runtime (base + that venv + two helper scripts; the last
# stage, so a plain `docker build` gives the service). loadtest is a small side image with
# locust only: the locustfile talks HTTP and imports nothing of the project.
#
# Every Python pin comes from pyproject.toml (docker/requirements.py turns it into the
# requirement files); the only versions named here are the base images and the FAISS GPU wheel.

ARG VARIANT=cpu
ARG CPU_BASE=python:3.12.11-slim-bookworm
# The CUDA *base* flavour (CUDA runtime, NVIDIA container env, driver requirement check):
# torch and faiss-gpu bring their own CUDA libraries as wheels, so the larger -runtime flavour
# would only add a second copy of cuBLAS & co. torch 2.13.0 from PyPI is built for CUDA 13.0,
# hence a 13.0 base: the host needs an NVIDIA driver >= 580 and the NVIDIA container toolkit.
ARG GPU_BASE=nvidia/cuda:13.0.1-base-ubuntu24.04

FROM ${CPU_BASE} AS base-cpu

FROM ${GPU_BASE} AS base-gpu
# Ubuntu 24.04's Python 3.12 (the same minor as the CPU image). Versions are not pinned: the
# archive keeps only the current security build of each package, so a pin breaks the build
# after the next update, and the point of rebuilding is to get those updates.
# hadolint ignore=DL3008
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        ca-certificates python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*

# base-${VARIANT} names one of the two stages above, not an image: nothing to tag.
# hadolint ignore=DL3006
FROM base-${VARIANT} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH
# uid/gid 10001: numeric and not 0, so `USER 10001` satisfies Kubernetes' runAsNonRoot.
# /data is the one writable place; a named volume mounted on /data/... starts with its owner.
RUN groupadd --system --gid 10001 sessionrec \
    && useradd --system --no-log-init --uid 10001 --gid sessionrec \
        --create-home --home-dir /home/sessionrec --shell /usr/sbin/nologin sessionrec \
    && mkdir -p /data/artifacts /data/state /data/datasets \
    && chown -R sessionrec:sessionrec /data

FROM base AS builder
ARG VARIANT
# A plain `pip install torch==2.13.0` on Linux resolves to PyPI's CUDA build (GBs of CUDA
# wheels): the CPU image takes torch from PyTorch's CPU wheel index instead.
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
# pyproject.toml pins faiss-cpu==1.15.1. The GPU image installs faiss-gpu 1.15.1, the same FAISS
# release built with CUDA 12 (its CUDA 12 runtime and cuBLAS come as nvidia-*-cu12 wheels and
# load beside torch's CUDA 13 libraries under one >= 580 driver). Both wheels provide the
# `faiss` module, so requirements.py swaps the pin (never both installed) and the project is
# installed with --no-deps; the index code falls back to the CPU index where FAISS has no GPU
# version (HNSW, k > 2048).
ARG FAISS_GPU=faiss-gpu==1.15.1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY docker/requirements.py docker/
# torch first and alone (its wheel index depends on the variant), then every other pin.
RUN python3 -m venv /opt/venv \
    && python docker/requirements.py --variant "$VARIANT" --faiss-gpu "$FAISS_GPU" --out /tmp/req \
    && if [ "$VARIANT" = cpu ]; then \
        pip install --no-cache-dir --index-url "$TORCH_CPU_INDEX" -r /tmp/req/torch.txt; \
    else \
        pip install --no-cache-dir -r /tmp/req/torch.txt; \
    fi \
    && pip install --no-cache-dir -r /tmp/req/runtime.txt
# The packages pyproject.toml includes ([tool.setuptools.packages.find]), installed as a wheel
# (not editable): the venv is self-contained and is all the runtime stage copies.
COPY sessionrec/ sessionrec/
COPY model_store/ model_store/
COPY training/ training/
COPY index/ index/
COPY service/ service/
# pip check and the import smoke test need the CPU build: in the GPU image pip check reports the
# deliberately absent faiss-cpu, and importing faiss-gpu without a driver proves little.
RUN pip install --no-cache-dir --no-deps . \
    && if [ "$VARIANT" = cpu ]; then pip check && python -I -c "import service.app"; fi \
    && sessionrec --help > /dev/null

FROM base AS loadtest
WORKDIR /loadtests
COPY pyproject.toml docker/requirements.py /tmp/build/
RUN python3 -m venv /opt/venv \
    && python /tmp/build/requirements.py --pyproject /tmp/build/pyproject.toml \
        --extra dev --only locust > /tmp/build/locust.txt \
    && pip install --no-cache-dir -r /tmp/build/locust.txt \
    && rm -rf /tmp/build
USER 10001:10001
HEALTHCHECK NONE
ENTRYPOINT ["locust"]
CMD ["--help"]

FROM base AS runtime
ARG VARIANT
LABEL org.opencontainers.image.title="sessionrec" \
      org.opencontainers.image.description="Next-session recommendation service (SessionRec)" \
      io.sessionrec.variant="${VARIANT}"
COPY --from=builder /opt/venv /opt/venv
COPY docker/bootstrap.py docker/healthcheck.py /app/docker/
WORKDIR /app
# Defaults for the service's settings (README, "Settings"); no secret is baked in: set
# SESSIONREC_ADMIN_TOKEN at run time to enable /admin/*. Without a Redis URL the service starts
# an embedded Redis whose AOF lives in SESSIONREC_DATA_DIR; set SESSIONREC_REDIS_URL (as
# docker-compose.yml does) to use a real one.
ENV SESSIONREC_REGISTRY=/data/artifacts \
    SESSIONREC_DATA_DIR=/data/state
USER 10001:10001
EXPOSE 8000
# Liveness only: readiness (/readyz: model warmed up, Redis answering) is the orchestrator's
# business (docker-compose's api healthcheck, a Kubernetes readinessProbe).
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "/app/docker/healthcheck.py", "/healthz"]
ENTRYPOINT ["sessionrec"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
