# syntax=docker/dockerfile:1
# The PSAD serving image: FastAPI + ONNX Runtime + Redis client, and only the request path's code
# (service/ and export/, see docs/architecture.md): no torch, pandas or training code.
# Training and export run elsewhere (`pip install .[train]`); this image serves exported bundles.
#
#   docker build -t psad .                                                 # CPU
#   docker build -t psad:gpu --build-arg ORT_PACKAGE="onnxruntime-gpu[cuda,cudnn]" .
#   docker build -t psad --build-arg EXTRAS=remote,tracing .              # s3:// / gs:// models, OpenTelemetry
#   docker build -t psad-tools --target tools .                            # `psad profiles load` etc.
#   docker build -t psad-shadow --target shadow .                          # `psad shadow run`
#
# The GPU variant takes CUDA and cuDNN from NVIDIA's pip wheels (LD_LIBRARY_PATH below), so the
# base image stays python:slim; run it with `--gpus all` and check the active providers in the log.

ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim AS build
ARG ORT_PACKAGE=onnxruntime
# Optional extras of the serving image, comma-separated: remote (PSAD_MODEL_REPO=s3://, gs://),
# tracing (PSAD_TRACING); none by default.
ARG EXTRAS=""
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml README.md ./
COPY export ./export
COPY service ./service
# The base dependencies are the serving ones (pandas lives in the `tools` extra, torch in `train`).
# Swap the CPU runtime for the requested one when it differs. Versions come from pyproject.toml's
# bounds and the ORT_PACKAGE build argument (pin it there, e.g. onnxruntime==1.22.1).
# Without psad/ in the context the `psad` script could not start: the image runs `psad-serve`.
# The import check fails the build if the request path reaches for any offline package.
# hadolint ignore=DL3013
RUN pip install ".${EXTRAS:+[$EXTRAS]}" \
 && if [ "$ORT_PACKAGE" != "onnxruntime" ]; then pip uninstall -y onnxruntime && pip install "$ORT_PACKAGE"; fi \
 && rm /opt/venv/bin/psad \
 && python -c "import sys; sys.modules.update(dict.fromkeys(('torch', 'pandas', 'pyarrow', 'tqdm', 'training', 'psad', 'loadtest'))); import service.app, service.cli"

# The offline tools that need no torch (`psad profiles load` and `mark`): what docker-compose's
# one-shot `profiles` service runs. Always the CPU runtime: the tools score nothing.
FROM build AS tools
COPY training ./training
COPY loadtest ./loadtest
COPY psad ./psad
# hadolint ignore=DL3013
RUN pip uninstall -y onnxruntime-gpu 2>/dev/null; pip install ".[tools]" && python -c "import psad.load_profiles"
USER 10001:10001
CMD ["psad", "--help"]

# The shadow consumer (`psad shadow run`, docs/shadow.md): it decodes the teacher of each sampled
# list, so it needs torch (the `train` extra). The CPU wheel, from PyTorch's own index: PyPI's
# Linux wheel pulls several GB of CUDA libraries, and a sample of the traffic needs no GPU.
# Results go to /shadow, a volume the unprivileged user owns.
FROM build AS shadow
ARG TORCH_VERSION=2.13.0
COPY training ./training
COPY loadtest ./loadtest
COPY psad ./psad
# hadolint ignore=DL3013
RUN pip uninstall -y onnxruntime-gpu 2>/dev/null; \
    pip install --index-url https://download.pytorch.org/whl/cpu "torch==${TORCH_VERSION}" \
 && pip install ".[train]" \
 && python -c "import torch, psad.shadow.cli; assert torch.version.cuda is None, torch.__version__" \
 && mkdir -p /shadow && chown 10001:10001 /shadow
USER 10001:10001
VOLUME ["/shadow"]
EXPOSE 9109
CMD ["psad", "shadow", "run", "--out", "/shadow", "--metrics-port", "9109"]

FROM python:${PYTHON_VERSION}-slim AS serve
ARG PYTHON_VERSION
RUN groupadd --system --gid 10001 psad \
 && useradd --system --uid 10001 --gid psad --home-dir /app --shell /usr/sbin/nologin psad \
 && mkdir -p /app /models /data \
 && chown psad:psad /app /models /data
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PSAD_MODEL_REPO=/models \
    PSAD_REDIS_URL=redis://redis:6379/0 \
    LD_LIBRARY_PATH=/opt/venv/lib/python${PYTHON_VERSION}/site-packages/nvidia/cudnn/lib:/opt/venv/lib/python${PYTHON_VERSION}/site-packages/nvidia/cublas/lib:/opt/venv/lib/python${PYTHON_VERSION}/site-packages/nvidia/cuda_runtime/lib:/opt/venv/lib/python${PYTHON_VERSION}/site-packages/nvidia/cufft/lib:/opt/venv/lib/python${PYTHON_VERSION}/site-packages/nvidia/curand/lib:/opt/venv/lib/python${PYTHON_VERSION}/site-packages/nvidia/cuda_nvrtc/lib
WORKDIR /app
USER 10001:10001
EXPOSE 8000
VOLUME ["/models", "/data"]
# python:slim has no curl; the standard library is enough for a liveness probe.
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/livez', timeout=2)"]
CMD ["psad-serve", "serve", "--host", "0.0.0.0"]
