"""Which onnxruntime provider the app runs on and why (clipteacher.runtime.providers), and the stdlib check of
the CUDA provider's libraries (clipteacher.runtime.cuda_libs). This machine has no GPU: a fake nvidia-smi on
PATH makes a GPU "visible", so the CUDA provider is tried and fails on the missing driver, as on a GPU host
whose container was started without --gpus."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import onnxruntime as ort
import pytest

from clipteacher.app import service as svc
from clipteacher.app.ui import build_demo
from clipteacher.runtime import Bundle, cuda_libs, providers
from helpers import ROOT, free_port


@pytest.fixture(scope="module")
def fake_gpu_path(tmp_path_factory) -> str:
    """PATH with an `nvidia-smi` that does nothing first."""
    folder = tmp_path_factory.mktemp("fake_gpu")
    (folder / "nvidia-smi").write_text("#!/bin/sh\nexit 0\n")
    (folder / "nvidia-smi").chmod(0o755)
    return f"{folder}{os.pathsep}{os.environ.get('PATH', '')}"


def run_python(code: str, env: dict, timeout: int = 120) -> subprocess.CompletedProcess:
    """A fresh interpreter (nothing preloaded, no torch): the app process's view of the libraries."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, **env}, timeout=timeout)


def cuda_provider_installed() -> bool:
    return "CUDAExecutionProvider" in ort.get_available_providers()


def test_visible_gpu_without_a_usable_cuda_provider_falls_back_and_says_why(bundle_dir, fake_gpu_path):
    code = f"""
import json
from clipteacher.runtime import Bundle
b = Bundle({str(bundle_dir)!r}, verbose=False)
print(json.dumps([b.provider, b.fallback_reason]))
"""
    res = run_python(code, {"PATH": fake_gpu_path, "CLIPTEACHER_DEVICE": "auto"})
    assert res.returncode == 0, res.stderr[-2000:]
    provider, reason = json.loads(res.stdout.strip().splitlines()[-1])
    assert provider == "CPUExecutionProvider"
    assert reason and "\n" not in reason and reason in res.stderr  # logged as a warning too
    if not cuda_provider_installed():
        assert "no CUDA provider" in reason
    elif cuda_libs.check().ok:
        # the nvidia wheels were preloaded, so only the driver is missing (without onnxruntime.preload_dlls()
        # the provider library stops at libcublasLt.so.13 although the wheels are installed)
        assert reason.startswith("the NVIDIA driver's libcuda.so.1 did not load"), reason
        assert "--gpus all" in reason


def test_device_cuda_exits_2_with_the_reason_in_one_line(bundle_dir):
    res = subprocess.run([sys.executable, "app/run.py", "--bundle", str(bundle_dir), "--port", str(free_port())],
                         capture_output=True, text=True, cwd=ROOT, timeout=120,
                         env={**os.environ, "CLIPTEACHER_DEVICE": "cuda", "GRADIO_ANALYTICS_ENABLED": "False"})
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2, res.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: CLIPTEACHER_DEVICE=cuda, but the CUDA provider cannot run: ")


def test_device_cpu_never_tries_cuda(bundle_dir, fake_gpu_path, monkeypatch):
    monkeypatch.setenv("PATH", fake_gpu_path)
    monkeypatch.setenv("CLIPTEACHER_DEVICE", "cpu")
    monkeypatch.setattr(providers, "preload_cuda_libraries", lambda: pytest.fail("CUDA libraries preloaded"))
    b = Bundle(bundle_dir, verbose=False)
    assert (b.provider, b.fallback_reason) == ("CPUExecutionProvider", None)


def test_no_visible_gpu_is_the_cpu_without_a_warning(bundle_dir, monkeypatch, caplog):
    monkeypatch.setattr(providers, "gpu_visible", lambda: None)
    monkeypatch.delenv("CLIPTEACHER_DEVICE", raising=False)
    b = Bundle(bundle_dir, verbose=False)
    assert (b.provider, b.fallback_reason) == ("CPUExecutionProvider", None)
    assert not [r for r in caplog.records if r.levelname == "WARNING"]


def test_a_bad_device_value_is_one_line(bundle_dir, monkeypatch):
    monkeypatch.setenv("CLIPTEACHER_DEVICE", "gpu")
    with pytest.raises(providers.DeviceError, match=r"^CLIPTEACHER_DEVICE must be one of auto, cuda, cpu, got 'gpu'$"):
        Bundle(bundle_dir, verbose=False)


def test_info_and_footer_name_the_provider_and_the_fallback_reason(bundle_dir, fake_gpu_path, monkeypatch):
    monkeypatch.setenv("PATH", fake_gpu_path)
    monkeypatch.delenv("CLIPTEACHER_DEVICE", raising=False)
    service = svc.Service(Bundle(bundle_dir, verbose=False))
    reason = service.bundle.fallback_reason
    info = service.info()
    assert info["provider"] == "CPUExecutionProvider" and reason and info["fallback_reason"] == reason
    footer = [block for block in build_demo(service).blocks.values() if getattr(block, "elem_id", None) == "footer"]
    assert len(footer) == 1 and "`CPU`" in footer[0].value and reason in footer[0].value


# ---------------------------------------------------------------------------- the library check


LDD = """\
\tlinux-vdso.so.1 (0x00007ffd)
\tlibcublasLt.so.13 => /sp/nvidia/cu13/lib/libcublasLt.so.13 (0x00007f01)
\tlibcudart.so.13 => not found
\tlibcuda.so.1 => not found
\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f02)
\t/lib64/ld-linux-x86-64.so.2 (0x00007f03)
"""


def test_ldd_output_is_parsed_into_resolved_and_missing():
    resolved, missing = cuda_libs.parse_ldd(LDD)
    assert resolved == {"libcublasLt.so.13": "/sp/nvidia/cu13/lib/libcublasLt.so.13",
                        "libc.so.6": "/lib/x86_64-linux-gnu/libc.so.6"}
    assert missing == ["libcudart.so.13", "libcuda.so.1"]


def test_only_the_driver_may_be_missing():
    report = cuda_libs.Report("sp", distributions=["onnxruntime_gpu-1.31.1.dist-info"], resolved={"a": "/a"},
                              missing={"libcuda.so.1": {"x"}})
    assert report.ok and report.summary() == "provider libs: ok (1 resolved; missing only libcuda.so.1)"
    report.missing["libcudart.so.13"] = {"x"}
    assert not report.ok and report.summary() == "provider libs: FAILED (1 resolved; missing libcudart.so.13)"
    two = cuda_libs.Report("sp", distributions=["onnxruntime-1.31.1.dist-info", "onnxruntime_gpu-1.31.1.dist-info"])
    assert not two.ok and "shared by onnxruntime-1.31.1.dist-info" in two.summary()


def test_the_check_runs_as_a_stdlib_script_and_says_when_it_cannot_check(tmp_path):
    """Run by path with Python's isolated mode (no site-packages, no PYTHONPATH), as docker/smoke.sh runs it
    inside the image."""
    res = subprocess.run([sys.executable, "-I", str(ROOT / "clipteacher" / "runtime" / "cuda_libs.py"),
                          "--site-packages", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and res.stdout.strip().splitlines()[-1].startswith("provider libs: FAILED (no ")
