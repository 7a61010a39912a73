# syntax=docker/dockerfile:1
# The image of the Ray head and worker pods (and of job drivers): Python 3.11, a CUDA build of torch, Ray,
# DeepSpeed and this project, pinned by constraints.txt like the development venv.
#
#   docker build -t metaformer-platform .
#   docker run --rm --gpus all metaformer-platform                       # the embedded default job
#   ray job submit --working-dir . -- python jobs/pretrain.py ...       # against pods running this image
#
# Not built by CI (no Docker engine there); tests/unit/test_packaging.py checks what it copies and runs.
# torch's wheels bring their own CUDA libraries (the nvidia-* packages), so the base image only has to
# provide the driver hookup: the small `base` flavour, not `runtime` or `cudnn`.
ARG CUDA_IMAGE=nvidia/cuda:13.0.2-base-ubuntu22.04
FROM ${CUDA_IMAGE}

# Where torch and torchvision come from: PyPI by default; set a wheel index for another CUDA build.
ARG TORCH_INDEX_URL=

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    RAY_USAGE_STATS_ENABLED=0 \
    MLFLOW_DISABLE_TELEMETRY=true

# Python 3.11 (deadsnakes: Ubuntu 22.04 ships 3.10). gcc and the Python headers: Triton compiles its launcher
# and DeepSpeed its ops (ninja comes from pip) when first used. git: MLflow records the commit.
RUN apt-get update \
 && apt-get install -y --no-install-recommends software-properties-common gpg-agent \
 && add-apt-repository -y ppa:deadsnakes/ppa \
 && apt-get update \
 && apt-get install -y --no-install-recommends \
      python3.11 python3.11-venv python3.11-dev build-essential git ca-certificates curl \
 && apt-get purge -y software-properties-common gpg-agent && apt-get autoremove -y \
 && rm -rf /var/lib/apt/lists/* \
 && python3.11 -m venv $VIRTUAL_ENV \
 && useradd --create-home --uid 1000 ray

WORKDIR /app

# Dependencies first (a layer that changes only with the pins), then the project's code. psycopg: the MLflow
# server deployment (infra/k8s/mlflow.yaml) runs this image against PostgreSQL (postgresql+psycopg://...).
COPY pyproject.toml constraints.txt ./
RUN pip install -c constraints.txt --upgrade pip setuptools wheel \
 && pip install -c constraints.txt ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} torch torchvision \
 && python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
      > /tmp/requirements.txt \
 && pip install -c constraints.txt -r /tmp/requirements.txt \
 && pip install -c constraints.txt "psycopg[binary]==3.3.9" \
 && DS_BUILD_OPS=0 pip install --no-build-isolation -c constraints.txt deepspeed

COPY README.md ./
COPY platform ./platform
COPY jobs ./jobs
COPY pipelines ./pipelines
RUN pip install --no-deps -c constraints.txt . \
 && python -c "import metaformer_platform, torch, ray, deepspeed; print('torch', torch.__version__, 'cuda', torch.version.cuda)" \
 && chown ray /app

# Jobs write their default MLflow store (./mlflow.db) and caches as this user: /app and its home are its own.
USER ray
CMD ["python", "jobs/pretrain.py"]
