# syntax=docker/dockerfile:1
# Kiln's model servers, both from this one file. Build from the repository root; SERVICE picks
# the server (img2img or mesh), VARIANT the hardware (gpu or cpu):
#   docker build -f deploy/docker/server.Dockerfile --build-arg SERVICE=img2img --build-arg VARIANT=gpu -t kiln/img2img:gpu .
#   docker build -f deploy/docker/server.Dockerfile --build-arg SERVICE=mesh --build-arg VARIANT=cpu -t kiln/mesh:cpu .
# Kiln installs as one package holding both servers, so both images share every layer up to the
# `server` stage; a `server-<SERVICE>` stage adds only what differs: the server's settings
# section and ports, the service its health check asks for, and its console script.
ARG SERVICE=img2img
ARG VARIANT=gpu
# PyPI's Linux wheel of the torch uv.lock pins (2.13.0) is the CUDA 13.0 build; the base matches it.
ARG CUDA_IMAGE=nvidia/cuda:13.0.2-runtime-ubuntu24.04
# Same Python minor as the GPU image's (Ubuntu 24.04 ships 3.12).
ARG PYTHON_IMAGE=python:3.12-slim-bookworm

# ---- the two bases: everything that differs between the variants lives here. KILN_TORCH_INDEX
# and KILN_TORCH_DEVICE are facts of the variant for the stages below; the servers never read them.
FROM ${PYTHON_IMAGE} AS base-cpu
ENV KILN_TORCH_INDEX=https://download.pytorch.org/whl/cpu \
    KILN_TORCH_DEVICE=cpu

FROM ${CUDA_IMAGE} AS base-gpu
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv libgomp1 \
    && rm -rf /var/lib/apt/lists/*
# The torch wheel brings its own CUDA libraries; the base brings the driver hooks. A named
# device that is missing is a startup error, so a GPU image never falls back to the CPU silently.
ENV KILN_TORCH_INDEX=https://pypi.org/simple \
    KILN_TORCH_DEVICE=cuda

# ---- build: a virtualenv from uv.lock's exports (torch first), then Kiln, in /opt/kiln
# hadolint ignore=DL3006
FROM base-${VARIANT} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/kiln/bin:$PATH
# PyPI has no Linux aarch64 wheels of PyMCubes and xatlas: on arm64 (Graviton, GH200) pip compiles
# them from their sdists, so this stage, and only this one, gets a compiler there.
RUN if [ "$(uname -m)" = aarch64 ]; then \
        apt-get update \
        && apt-get install -y --no-install-recommends g++ python3-dev \
        && rm -rf /var/lib/apt/lists/*; \
    fi
COPY requirements/torch.txt requirements/runtime.txt /src/requirements/
# torch at the locked version from the variant's index (CUDA or CPU build), then everything else
# exactly as locked: hash-checked and --no-deps, so nothing resolves and nothing can swap torch.
RUN python3 -m venv /opt/kiln \
    && pip install --index-url "$KILN_TORCH_INDEX" -r /src/requirements/torch.txt \
    && pip install --no-deps --require-hashes -r /src/requirements/runtime.txt
COPY clients/python/ /src/clients/python/
COPY pyproject.toml /src/
COPY services/ /src/services/
RUN pip install --no-deps /src/clients/python /src \
    && pip check \
    # rembg's first import JIT-compiles pymatting for about a minute: pay it here, not at startup.
    && python -c "import rembg"

# ---- what every server image holds
# hadolint ignore=DL3006
FROM base-${VARIANT} AS server
COPY --from=build /opt/kiln /opt/kiln
# Both images carry the cache filler, so the Job and the Compose profile can run either.
COPY deploy/docker/fetch-models.sh /usr/local/bin/kiln-fetch-models
# A fixed numeric user, so Kubernetes' runAsNonRoot can check it; /models and /data are its own.
RUN useradd --uid 10001 --user-group --create-home --home-dir /home/kiln kiln \
    && mkdir -p /models /data \
    && chown kiln:kiln /models /data
ENV PATH=/opt/kiln/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HF_HOME=/models/huggingface \
    U2NET_HOME=/models/rembg \
    KILN_STORAGE__DATA_DIR=/data
# The model cache (Hugging Face hub cache, rembg models) and the artifacts outlive the container.
VOLUME ["/models", "/data"]
USER 10001:10001
WORKDIR /home/kiln

# ---- one stage per server: only what differs between them. EXPOSE reads the port settings, so
# each port is written once. The health check reads the port from the environment when it runs,
# so overriding the setting keeps the check right; NOT_SERVING until the model is loaded and warm,
# and a first start downloads several GB. On SIGTERM a server turns NOT_SERVING at once and lets
# in-flight jobs drain for KILN_<SERVICE>__SERVER__SHUTDOWN_GRACE_S.
FROM server AS server-img2img
ENV KILN_IMG2IMG__RUNTIME__DEVICE=${KILN_TORCH_DEVICE} \
    KILN_IMG2IMG__SERVER__HOST=0.0.0.0 \
    KILN_IMG2IMG__SERVER__PORT=50051 \
    KILN_IMG2IMG__SERVER__METRICS_PORT=9091
EXPOSE ${KILN_IMG2IMG__SERVER__PORT} ${KILN_IMG2IMG__SERVER__METRICS_PORT}
HEALTHCHECK --interval=15s --timeout=5s --start-period=900s --retries=3 \
    CMD ["sh", "-c", "exec python -m kiln_runtime.healthcheck --port \"$KILN_IMG2IMG__SERVER__PORT\" --service kiln.img2img.v1.Img2ImgProvider"]
CMD ["kiln-img2img"]

FROM server AS server-mesh
ENV KILN_MESH__RUNTIME__DEVICE=${KILN_TORCH_DEVICE} \
    KILN_MESH__SERVER__HOST=0.0.0.0 \
    KILN_MESH__SERVER__PORT=50052 \
    KILN_MESH__SERVER__METRICS_PORT=9092
EXPOSE ${KILN_MESH__SERVER__PORT} ${KILN_MESH__SERVER__METRICS_PORT}
HEALTHCHECK --interval=15s --timeout=5s --start-period=900s --retries=3 \
    CMD ["sh", "-c", "exec python -m kiln_runtime.healthcheck --port \"$KILN_MESH__SERVER__PORT\" --service kiln.mesh.v1.MeshProvider"]
CMD ["kiln-mesh"]

# ---- the image: the server SERVICE names. Docker reads an unknown name as an image to pull
# ("server-<name>"), so a misspelt SERVICE fails the build instead of building something else.
# hadolint ignore=DL3006
FROM server-${SERVICE}
