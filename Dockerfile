# ditcache for GPU hosts.
#   docker build -t ditcache .
#   docker run --gpus all -p 8000:8000 -v ditcache-models:/models ditcache --model black-forest-labs/FLUX.1-dev
# or, with a reserved GPU and the settings of docker/example.env: docker compose -f docker/compose.yaml up
# The host needs an NVIDIA driver and the NVIDIA Container Toolkit.

ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
FROM ${CUDA_IMAGE}

# Keep TORCH_VERSION equal to the Makefile's; pick the wheel index that matches the image's CUDA.
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv

# torch first, pinned and from the CUDA index: resolved as a dependency it would come from PyPI's
# default build. Its own layer, so that changes to the project do not download it again.
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"

WORKDIR /app
COPY pyproject.toml README.md ./
COPY cache_engine ./cache_engine
COPY tiny_pipelines ./tiny_pipelines
COPY server ./server
RUN pip install .

RUN useradd --create-home --uid 10001 ditcache \
    && mkdir -p /models \
    && chown ditcache:ditcache /models
USER ditcache

# Built-in models and hub downloads both land in the /models volume, so a restart loads, not fetches.
ENV DITCACHE_HOST=0.0.0.0 \
    DITCACHE_PORT=8000 \
    DITCACHE_DEVICE=cuda \
    DITCACHE_DTYPE=bfloat16 \
    DITCACHE_CACHE_DIR=/models \
    HF_HOME=/models/huggingface
VOLUME ["/models"]
EXPOSE 8000

# /health answers while models load; a large model can take minutes, hence the long start period.
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD curl -fsS "http://127.0.0.1:${DITCACHE_PORT}/health" || exit 1

ENTRYPOINT ["ditcache", "serve"]
