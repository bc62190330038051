# syntax=docker/dockerfile:1
# The CLIPTeacher Gradio app: onnxruntime-gpu and Gradio, no torch in the final image.
#
#   docker build -t clipteacher-app .
#   docker run --gpus all -p 7860:7860 clipteacher-app     # CUDA provider (host NVIDIA driver >= 580, for CUDA 13)
#   docker run -p 7860:7860 clipteacher-app                # no GPU: the CPU provider
# CLIPTEACHER_DEVICE=auto (default) falls back to the CPU with a warning naming the library that did not load;
# -e CLIPTEACHER_DEVICE=cuda makes the container exit (code 2, that reason) instead; cpu never tries CUDA.
#
# The bundle is built into the image: stage "bundle" exports the model folder assets/default with
# clipteacher-export (the export needs torch; that stage is thrown away). To serve another bundle,
# mount it and point CLIPTEACHER_BUNDLE at it:
#   docker run --gpus all -p 7860:7860 -v "$PWD/bundles/mine:/bundle:ro" -e CLIPTEACHER_BUNDLE=/bundle clipteacher-app
#
# Base images are build arguments (docker/smoke.sh passes local stand-ins for both):
#   PY_IMAGE        the export stage: Python 3.10+ with pip on PATH.
#   APP_BASE_IMAGE  the app: a glibc Linux with python3 (3.10+) and its venv module. A plain Python image, not
#                   nvidia/cuda: the CUDA 13 and cuDNN 9 libraries come as nvidia-* pip wheels with onnxruntime-gpu,
#                   in the major versions this onnxruntime build links, and onnxruntime.preload_dlls() loads them
#                   from the venv. Only the driver's libcuda.so.1 comes from the host (mounted by --gpus). A CUDA
#                   base image would add a second copy of those libraries, of whatever CUDA major its tag has
#                   (a CUDA 12 base under a CUDA 13 onnxruntime is why this image used to serve on the CPU).
ARG PY_IMAGE=python:3.11-slim
ARG APP_BASE_IMAGE=python:3.11-slim

# ---------------------------------------------------------------- stage 1: checkpoint -> ONNX bundle
FROM ${PY_IMAGE} AS bundle
# A CPU-only PyTorch index gives this throw-away stage a much smaller torch, e.g.
#   --build-arg PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG PIP_EXTRA_INDEX_URL=""
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY requirements.txt ./
RUN pip install -r requirements.txt
COPY pyproject.toml README.md ./
COPY clipteacher ./clipteacher
RUN pip install --no-deps .
COPY assets/default ./assets/default
RUN clipteacher-export --checkpoint assets/default --out /bundle

# ---------------------------------------------------------------- stage 2: the app
FROM ${APP_BASE_IMAGE}
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# What the app imports (tests/test_dockerfile.py checks this list against the app's imports). onnxruntime-gpu is
# pinned (requirements.txt has the same version); its [cuda,cudnn] extras bring cudart, NVRTC, cuFFT, cuRAND and
# cuDNN for CUDA 13. cuBLAS and nvJitLink, which its CUDA provider and cuFFT also link, arrive only through
# unversioned requirements of nvidia-cudnn-cu13 and nvidia-cufft, so they are held to CUDA 13 here.
# clipteacher/runtime/cuda_libs.py checks that every library resolves (tests/test_dockerfile.py on this
# requirement set, docker/smoke.sh inside the built image).
RUN pip install "onnxruntime-gpu[cuda,cudnn]==1.31.1" "nvidia-cublas~=13.0" "nvidia-nvjitlink~=13.0" \
    "gradio>=5.0" "numpy>=1.24" "opencv-python-headless>=4.8" "pillow>=10.0" \
    "scipy>=1.10" "threadpoolctl>=3.0" "tokenizers>=0.15" "ftfy>=6.0" "regex>=2023.0"

RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin app
WORKDIR /app
# Only the torch-free parts of the package that the app imports (tests/test_dockerfile.py checks the list).
COPY clipteacher/__init__.py clipteacher/io.py clipteacher/prompts.py clipteacher/request.py ./clipteacher/
COPY clipteacher/runtime ./clipteacher/runtime
COPY clipteacher/pseudo ./clipteacher/pseudo
COPY clipteacher/app ./clipteacher/app
COPY clipteacher/cli/__init__.py clipteacher/cli/app.py ./clipteacher/cli/
COPY app/run.py ./app/run.py
COPY --from=bundle /bundle ./bundles/default

ENV PYTHONPATH=/app \
    CLIPTEACHER_BUNDLE=/app/bundles/default \
    HOST=0.0.0.0 \
    PORT=7860 \
    CLIPTEACHER_DEVICE=auto \
    GRADIO_ANALYTICS_ENABLED=False
USER app
EXPOSE 7860
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/' % os.environ.get('PORT', '7860'), timeout=4)"]
CMD ["python", "app/run.py"]
