"""Which onnxruntime execution provider the app runs on, and why not CUDA when it is not CUDA.

CLIPTEACHER_DEVICE picks the policy (default auto):
  auto  CUDA when a GPU is visible (/dev/nvidia0, or nvidia-smi on PATH) and the CUDA provider works, else
        the CPU. A visible GPU whose provider fails is a warning that names the library that did not load.
  cuda  CUDA, or DeviceError with that reason (the app exits instead of serving slowly on the CPU).
  cpu   the CPU provider; CUDA is never tried.

Before a CUDA session, onnxruntime.preload_dlls() loads the CUDA and cuDNN libraries of the nvidia-* wheels
(onnxruntime-gpu[cuda,cudnn]). The provider library has no RUNPATH to them, so without it the provider fails on
libcublasLt.so.13 and onnxruntime falls back to the CPU with nothing but a log line.
"""
from __future__ import annotations

import contextlib
import ctypes
import io
import logging
import os
import shutil
from pathlib import Path
from typing import Callable

import onnxruntime as ort

from clipteacher.runtime import cuda_libs

DEVICE_ENV = "CLIPTEACHER_DEVICE"
DEVICES = ("auto", "cuda", "cpu")
CUDA, CPU = "CUDAExecutionProvider", "CPUExecutionProvider"
GPU_DEVICE = "/dev/nvidia0"
DRIVER_VERSION_FILE = "/proc/driver/nvidia/version"
log = logging.getLogger(__name__)
_preloaded: list[str] | None = None  # what preload_dlls() printed, once per process


class DeviceError(RuntimeError):
    """The requested device cannot be used; the message (one line) says why."""


def device_setting() -> str:
    """CLIPTEACHER_DEVICE, checked: auto (default), cuda or cpu."""
    value = os.environ.get(DEVICE_ENV, "").strip().lower() or "auto"
    if value not in DEVICES:
        raise DeviceError(f"{DEVICE_ENV} must be one of {', '.join(DEVICES)}, got {os.environ[DEVICE_ENV]!r}")
    return value


def gpu_visible() -> str | None:
    """What shows an NVIDIA GPU to this process ('/dev/nvidia0' or the nvidia-smi path), or None."""
    if os.path.exists(GPU_DEVICE):
        return GPU_DEVICE
    return shutil.which("nvidia-smi")


def preload_cuda_libraries() -> list[str]:
    """onnxruntime.preload_dlls() once per process (when this onnxruntime has it); returns the lines it printed
    (it prints, rather than raises, for each library it could not load)."""
    global _preloaded
    if _preloaded is None:
        out = io.StringIO()
        try:
            with contextlib.redirect_stdout(out):
                if hasattr(ort, "preload_dlls"):
                    ort.preload_dlls()
        except Exception as err:  # a broken install must not stop the CPU fallback; the reason comes below
            out.write(f"onnxruntime.preload_dlls() failed: {err}\n")
        _preloaded = [line for line in out.getvalue().splitlines() if line.strip()]
        for line in _preloaded:
            log.debug("preload_dlls: %s", line)
    return _preloaded


def driver_version() -> str | None:
    """The loaded NVIDIA kernel driver's version, from /proc (None without a driver)."""
    try:
        text = Path(DRIVER_VERSION_FILE).read_text()
    except OSError:
        return None
    words = [w for w in text.split() if w[:1].isdigit() and "." in w]
    return words[0] if words else None


def cuda_failure_reason(gpu: str | None) -> str:
    """One line: why the CUDA provider cannot run here. The library that did not load comes first (dlopen of the
    provider library after the preload, as onnxruntime itself loads it), then every other unresolved library."""
    if CUDA not in ort.get_available_providers():
        return (f"this onnxruntime {ort.__version__} has no CUDA provider (install onnxruntime-gpu[cuda,cudnn], "
                f"not onnxruntime)")
    parts = [] if gpu else [f"no GPU visible ({GPU_DEVICE} absent, no nvidia-smi on PATH)"]
    provider = Path(ort.__file__).parent / "capi" / cuda_libs.PROVIDER_LIB
    try:
        ctypes.CDLL(str(provider))
        failed = None
    except OSError as err:
        failed, _, detail = str(err).partition(": ")
        failed = os.path.basename(failed.strip())  # a soname, or a path when the library itself is broken
        if failed in cuda_libs.DRIVER_LIBS:
            parts.append(f"the NVIDIA driver's {failed} did not load ({detail}; on Docker: run with --gpus all)")
        else:
            parts.append(f"{failed} did not load ({detail})")
    if failed and failed not in cuda_libs.DRIVER_LIBS:
        others = [n for n in cuda_libs.check(str(provider.parents[2])).problems if n != failed]
        if others:
            parts.append("also unresolved: " + ", ".join(others))
    if failed is None:
        driver = driver_version()
        parts.append(f"the CUDA provider's libraries load but onnxruntime could not create it: CUDA 13 needs "
                     f"an NVIDIA driver >= 580 (this one: {driver or 'unknown'}) and a Turing or newer GPU")
    return "; ".join(parts).replace("\n", " ")


def open_session(create: Callable[[list[str]], ort.InferenceSession], providers: list[str] | None = None
                 ) -> tuple[ort.InferenceSession, str, str | None]:
    """Create a session with `create(providers)` on the provider CLIPTEACHER_DEVICE asks for.

    Returns (session, provider in use, fallback reason: why a visible GPU is not used, else None). An explicit
    `providers` list bypasses the policy. Raises DeviceError for CLIPTEACHER_DEVICE=cuda without a working
    CUDA provider, or a bad CLIPTEACHER_DEVICE value."""
    if providers:
        if CUDA in providers:
            preload_cuda_libraries()
        session = create(providers)
        return session, session.get_providers()[0], None
    device = device_setting()
    gpu = gpu_visible()
    if device == "cpu" or (device == "auto" and not gpu):
        log.info("onnxruntime provider: CPU (%s)", f"{DEVICE_ENV}=cpu" if device == "cpu" else "no GPU visible")
        return create([CPU]), CPU, None
    session = None
    if CUDA in ort.get_available_providers():
        preload_cuda_libraries()
        ort.set_default_logger_severity(4)  # onnxruntime's multi-line failure log: the reason below says it in one
        try:
            session = create([CUDA, CPU])  # onnxruntime falls back to the CPU itself when CUDA fails
        finally:
            ort.set_default_logger_severity(2)  # onnxruntime's default (warnings)
        if session.get_providers()[0] == CUDA:
            log.info("onnxruntime provider: CUDA (GPU %s)", gpu or "not visible, but CUDA works")
            return session, CUDA, None
    reason = cuda_failure_reason(gpu)
    if device == "cuda":
        raise DeviceError(f"{DEVICE_ENV}=cuda, but the CUDA provider cannot run: {reason}")
    log.warning("GPU visible (%s) but the CUDA provider failed, running on the CPU: %s", gpu, reason)
    return session or create([CPU]), CPU, reason
