# clipfed SuperExec image, CUDA (Flower 1.42): the server side (ServerApp: CLIP-Fed screening and
# distillation) on an NVIDIA GPU. Same layout as flwr/superexec (user `app` uid 49999, HOME=/app,
# venv /python/venv, ENTRYPOINT flower-superexec) so docker-compose.gpu.yml can swap it in.
#
#   docker build -f docker/superexec-cuda.Dockerfile -t clipfed-superexec-cuda:latest .
#
# Build args: CUDA_IMAGE (runtime base), FLWR_VERSION (pinned), TORCH_INDEX_URL: PyPI's Linux
# x86_64 torch wheels are CUDA builds that bundle their CUDA libraries; to pick a CUDA version use
# e.g. https://download.pytorch.org/whl/cu128 (the host driver must support it).
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04
FROM ${CUDA_IMAGE}

ARG FLWR_VERSION=1.42.0
ARG TORCH_INDEX_URL=https://pypi.org/simple

ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --uid 49999 --home-dir /app --create-home --shell /usr/sbin/nologin app \
    && python3 -m venv /python/venv \
    && chown -R app:app /python/venv /app

ENV PATH=/python/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONIOENCODING=UTF-8 \
    LANG=C.UTF-8 \
    LC_ALL=C.UTF-8 \
    HOME=/app
USER app
# created by `app` (WORKDIR alone may create it root-owned, and `sed -i` needs a writable folder)
RUN mkdir -p /app/clipfed
WORKDIR /app/clipfed

RUN python -m pip install --no-cache-dir -U pip \
    && python -m pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" torch torchvision \
    && python -m pip install --no-cache-dir "flwr==${FLWR_VERSION}" \
    && python -m pip freeze | grep -iE '^(torch|torchvision|flwr)==' > /app/constraints.txt

COPY --chown=app:app pyproject.toml README.md LICENSE ./
COPY --chown=app:app fltask ./fltask
COPY --chown=app:app client_app ./client_app
COPY --chown=app:app server_app ./server_app
COPY --chown=app:app clipfed_strategy ./clipfed_strategy
COPY --chown=app:app data_synth ./data_synth

RUN sed -i 's/"flwr\[simulation\]/"flwr/' pyproject.toml \
    && python -m pip install --no-cache-dir -c /app/constraints.txt . \
    && python -c "import flwr, torch; assert flwr.__version__ == '${FLWR_VERSION}', flwr.__version__; print('flwr', flwr.__version__, 'torch', torch.__version__, 'cuda', torch.version.cuda)"

WORKDIR /app
ENV FLWR_TELEMETRY_ENABLED=0 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1

ENTRYPOINT ["flower-superexec"]
