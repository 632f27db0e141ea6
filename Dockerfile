# syntax=docker/dockerfile:1
# Two images from one file:
#   docker build --target operator -t ghcr.io/vlm-training-operator/operator:$VERSION .
#   docker build --target trainer  -t ghcr.io/vlm-training-operator/trainer:$VERSION .
# ($VERSION: `python -c "import vlm_core; print(vlm_core.__version__)"`, the chart's appVersion.)
# Every `name==version` below must equal pyproject.toml's pin (tests/unit/test_dockerfile.py checks).
# Bases are pinned by tag; wheels are built in throw-away stages so the final images carry no
# compilers, no build backends and no source tree. Both run as the non-root uid APP_UID (10001), the
# number the chart's securityContext and the operator's trainer pods use (tests/unit/test_security.py).

ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm
# torch comes from this image (2.11, CUDA 12.8), not from the project's CPU pin.
ARG PYTORCH_IMAGE=pytorch/pytorch:2.11.0-cuda12.8-cudnn9-runtime
ARG APP_UID=10001

# ---------------------------------------------------------------------------------------------
# operator: Kopf + the planner. No torch: vlm_operator never imports it.
FROM ${PYTHON_IMAGE} AS operator-build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# The operator's runtime dependencies only; the project itself goes in with --no-deps below.
RUN pip install \
      kopf==1.45.2 \
      kubernetes==36.0.0 \
      pydantic==2.14.4 \
      pyyaml==6.0.4 \
      fsspec==2026.9.0 \
      s3fs==2026.9.0 \
      prometheus-client==0.26.0
WORKDIR /src
COPY pyproject.toml README.md ./
COPY operator/ operator/
COPY trainer/ trainer/
RUN pip install --no-deps . \
 && python -c "import kopf, kubernetes, vlm_operator.planner, vlm_core.spec"

FROM ${PYTHON_IMAGE} AS operator
ARG APP_UID
LABEL org.opencontainers.image.title="vlm-operator" \
      org.opencontainers.image.description="Kopf operator for staged VLM training (VLMTrainingJob)" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
COPY --from=operator-build /opt/venv /opt/venv
RUN useradd --uid "${APP_UID}" --user-group --no-create-home --shell /usr/sbin/nologin vlm
USER ${APP_UID}:${APP_UID}
# 8080: Prometheus metrics; 8081: Kopf liveness (/healthz).
EXPOSE 8080 8081
ENTRYPOINT ["vlmctl"]
CMD ["operator", "--all-namespaces"]

# ---------------------------------------------------------------------------------------------
# trainer: what torchrun runs in a stage's pods (`torchrun ... -m vlm_trainer`).
FROM ${PYTORCH_IMAGE} AS trainer-build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY operator/ operator/
COPY trainer/ trainer/
# DeepSpeed is an sdist: build a pure-Python wheel here (ops JIT-built or torch Adam at run time).
RUN pip wheel --no-deps --wheel-dir /wheels . \
 && DS_BUILD_OPS=0 pip wheel --no-deps --no-build-isolation --wheel-dir /wheels deepspeed==0.19.8

FROM ${PYTORCH_IMAGE} AS trainer
ARG APP_UID
LABEL org.opencontainers.image.title="vlm-trainer" \
      org.opencontainers.image.description="Trainer for staged VLM training, run by torchrun in each stage's pods" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HUB_OFFLINE=1 \
    HOME=/home/vlm
# The project without its torch pin (the base image's CUDA torch stays), then the trainer's runtime
# dependencies, pinned like pyproject.toml.
RUN --mount=type=bind,from=trainer-build,source=/wheels,target=/wheels \
    pip install --no-deps /wheels/vlm_training_operator-*.whl \
 && pip install \
      /wheels/deepspeed-*.whl \
      transformers==5.17.0 \
      peft==0.21.2 \
      pydantic==2.14.4 \
      pyyaml==6.0.4 \
      fsspec==2026.9.0 \
      s3fs==2026.9.0 \
      webdataset==1.0.2 \
      pyarrow==26.0.1 \
      pillow==13.0.0 \
      prometheus-client==0.26.0 \
      bitsandbytes==0.50.2 \
 && python -c "import torch, transformers, peft, webdataset, vlm_trainer.metrics"
# HOME (/home/vlm) is an emptyDir in stage pods (read-only root filesystem), owned by fsGroup APP_UID.
RUN useradd --uid "${APP_UID}" --user-group --create-home --shell /usr/sbin/nologin vlm
USER ${APP_UID}:${APP_UID}
WORKDIR /home/vlm
# 9400 + local rank: Prometheus metrics per trainer process; 29400: torchrun rendezvous.
EXPOSE 9400 29400
ENTRYPOINT ["torchrun"]
