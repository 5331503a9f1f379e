# clipfed SuperExec image, CPU (Flower 1.42): runs the ServerApp (at the SuperLink) and the
# ClientApps (one SuperExec per SuperNode) of this project with every dependency pre-installed,
# because runtime dependency installation is disabled in the deployment (offline).
#
#   docker build -f docker/superexec.Dockerfile -t clipfed-superexec:latest .
#
# Build args: FLWR_VERSION (pinned: must match the SuperLink/SuperNode images), BASE_IMAGE (e.g.
# flwr/superexec:1.42.0-py3.11-ubuntu24.04 to pick the Python), TORCH_INDEX_URL (CPU wheels by default).
ARG FLWR_VERSION=1.42.0
ARG BASE_IMAGE=flwr/superexec:${FLWR_VERSION}
FROM ${BASE_IMAGE}

ARG FLWR_VERSION=1.42.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

# The base image runs as the non-root user `app` (uid 49999), HOME=/app, venv /python/venv on PATH.
# created by `app` (WORKDIR alone may create it root-owned, and `sed -i` needs a writable folder)
RUN mkdir -p /app/clipfed
WORKDIR /app/clipfed

# torch first (own layer, CPU wheels), then pin what is installed so the project install keeps it.
RUN python -m pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" torch torchvision \
    && python -m pip freeze | grep -iE '^(torch|torchvision)==' > /app/constraints.txt \
    && echo "flwr==${FLWR_VERSION}" >> /app/constraints.txt

COPY --chown=app:app pyproject.toml README.md LICENSE ./
COPY --chown=app:app fltask ./fltask
COPY --chown=app:app client_app ./client_app
COPY --chown=app:app server_app ./server_app
COPY --chown=app:app clipfed_strategy ./clipfed_strategy
COPY --chown=app:app data_synth ./data_synth

# Deployment needs no Ray: drop the `simulation` extra; keep flwr at the image's version.
RUN sed -i 's/"flwr\[simulation\]/"flwr/' pyproject.toml \
    && python -m pip install --no-cache-dir -c /app/constraints.txt . \
    && python -c "import flwr, torch; assert flwr.__version__ == '${FLWR_VERSION}', flwr.__version__; print('flwr', flwr.__version__, 'torch', torch.__version__)"

WORKDIR /app
# Offline at run time: no telemetry, no Hugging Face downloads (weights come from /weights).
ENV FLWR_TELEMETRY_ENABLED=0 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1

ENTRYPOINT ["flower-superexec"]
