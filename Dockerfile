# syntax=docker/dockerfile:1
# The CLIPTeacher Gradio app for a GPU host: onnxruntime-gpu and Gradio, no torch in the final image.
#
#   docker build -t clipteacher-app .
#   docker run --gpus all -p 7860:7860 clipteacher-app     # CUDA provider
#   docker run -p 7860:7860 clipteacher-app                # no GPU: onnxruntime falls back to the CPU provider
#
# The bundle is built into the image: stage "bundle" exports assets/msrc21_default.pt with
# clipteacher-export (the export needs torch; that stage is thrown away). To serve another bundle,
# mount it and point CLIPTEACHER_BUNDLE at it:
#   docker run --gpus all -p 7860:7860 -v "$PWD/bundles/mine:/bundle:ro" -e CLIPTEACHER_BUNDLE=/bundle clipteacher-app

ARG CUDA_IMAGE=nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04

# ---------------------------------------------------------------- stage 1: checkpoint -> ONNX bundle
FROM python:3.11-slim AS bundle
# Pass a CPU-only PyTorch wheel index here to download a much smaller torch for this throw-away stage.
ARG PIP_EXTRA_INDEX_URL=""
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY requirements.txt ./
RUN pip install -r requirements.txt
COPY pyproject.toml README.md ./
COPY clipteacher ./clipteacher
RUN pip install --no-deps .
COPY assets/msrc21_default.pt ./assets/msrc21_default.pt
RUN clipteacher-export --checkpoint assets/msrc21_default.pt --out /bundle

# ---------------------------------------------------------------- stage 2: the app
FROM ${CUDA_IMAGE}
ENV DEBIAN_FRONTEND=noninteractive PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# What the app imports (tests/test_dockerfile.py checks this list against the app's imports).
RUN pip install "onnxruntime-gpu>=1.18" "gradio>=5.0" "numpy>=1.24" "opencv-python-headless>=4.8" "pillow>=10.0" \
    "scipy>=1.10" "threadpoolctl>=3.0" "tokenizers>=0.15" "ftfy>=6.0" "regex>=2023.0"

RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin app
WORKDIR /app
# Only the torch-free parts of the package that the app imports (tests/test_dockerfile.py checks the list).
COPY clipteacher/__init__.py clipteacher/io.py clipteacher/prompts.py ./clipteacher/
COPY clipteacher/runtime ./clipteacher/runtime
COPY clipteacher/pseudo ./clipteacher/pseudo
COPY clipteacher/app ./clipteacher/app
COPY clipteacher/cli/__init__.py clipteacher/cli/app.py ./clipteacher/cli/
COPY app/run.py ./app/run.py
COPY assets/examples ./assets/examples
COPY --from=bundle /bundle ./bundles/msrc21

ENV PYTHONPATH=/app \
    CLIPTEACHER_BUNDLE=/app/bundles/msrc21 \
    HOST=0.0.0.0 \
    PORT=7860 \
    GRADIO_ANALYTICS_ENABLED=False
USER app
EXPOSE 7860
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/' % os.environ.get('PORT', '7860'), timeout=4)"]
CMD ["python", "app/run.py"]
