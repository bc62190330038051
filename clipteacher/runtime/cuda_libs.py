"""Can onnxruntime-gpu's CUDA provider find every shared library it needs? Answered without a GPU.

    python clipteacher/runtime/cuda_libs.py [--site-packages DIR] [-v]     # any Python 3.8+, no third-party package
    python -m clipteacher.runtime.cuda_libs [--site-packages DIR] [-v]

Stdlib only, so the same file checks a venv, a pip --target folder or a container image from the outside
or the inside. It looks at <site-packages>/onnxruntime/capi/libonnxruntime_providers_cuda.so and:
  1. lists its libraries as `ldd` does (the dynamic loader with LD_TRACE_LOADED_OBJECTS=1), with every
     <site-packages>/nvidia/*/lib folder first on the search path (the folders of the nvidia-* wheels that
     `onnxruntime-gpu[cuda,cudnn]` installs; onnxruntime.preload_dlls() loads from the same folders at run
     time), then any LD_LIBRARY_PATH already set (e.g. a CUDA base image's) and the ld.so cache;
     --isolated drops those two, so only the wheels and the loader's default folders count (what a plain
     base image with only these wheels would have, whatever else this machine has installed);
  2. also checks the libraries the provider opens with dlopen(), which ldd cannot see: cuDNN
     (libcudnn.so.9 and its libcudnn_*.so.9 engine libraries, which cuDNN dlopens from its own folder),
     cuFFT and NVRTC, in the versions of the provider's CUDA major, with ldd on each;
  3. checks that cuDNN was built for the provider's CUDA major (a CUDA 12 cuDNN does not serve CUDA 13).
Every library that does not resolve is reported. The NVIDIA driver's libcuda.so.1 is expected to be missing
here: the container runtime mounts it from the host (`docker run --gpus all`).

Exit status: 0 nothing missing but libcuda.so.1; 1 something else is missing; 2 the check cannot run.
"""
from __future__ import annotations

import argparse
import glob
import importlib.util
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field

DRIVER_LIBS = ("libcuda.so.1",)  # the host's NVIDIA driver, never a wheel or an image
PROVIDER_LIB = "libonnxruntime_providers_cuda.so"
LDD_LINE = re.compile(r"^\s*(\S+)\s+=>\s+(.*?)\s*(\(0x[0-9a-f]+\))?\s*$")
LOADERS = ("/lib64/ld-linux-x86-64.so.2", "/lib/ld-linux-aarch64.so.1")  # the ELF interpreters ldd uses
SYSTEM_DIRS = ("/lib", "/usr/lib", "/lib64", "/usr/lib64", "/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu")


@dataclass
class Report:
    """What one check found. `problems` lists what is missing apart from the driver."""

    site_packages: str
    distributions: list = field(default_factory=list)  # onnxruntime*.dist-info folders
    lib_dirs: list = field(default_factory=list)  # nvidia/*/lib folders
    resolved: dict = field(default_factory=dict)  # soname -> path
    missing: dict = field(default_factory=dict)  # soname -> set of files that need it
    notes: list = field(default_factory=list)
    error: str | None = None  # the check could not run

    @property
    def problems(self) -> list:
        found = sorted(n for n in self.missing if n not in DRIVER_LIBS)
        if len(self.distributions) > 1:  # e.g. onnxruntime (CPU) installed over onnxruntime-gpu
            found.append("one onnxruntime package folder shared by " + ", ".join(self.distributions))
        return found

    @property
    def ok(self) -> bool:
        return self.error is None and not self.problems

    def summary(self) -> str:
        if self.error:
            return "provider libs: FAILED (%s)" % self.error
        if self.problems:
            return "provider libs: FAILED (%d resolved; missing %s)" % (len(self.resolved), ", ".join(self.problems))
        driver = [n for n in DRIVER_LIBS if n in self.missing]
        return "provider libs: ok (%d resolved; %s)" % (
            len(self.resolved), "missing only " + ", ".join(driver) if driver else "nothing missing")


def default_site_packages() -> str | None:
    """The folder holding the onnxruntime this interpreter would import (found without importing it)."""
    spec = importlib.util.find_spec("onnxruntime")
    if spec is None or not spec.submodule_search_locations:
        return None
    return os.path.dirname(os.path.abspath(list(spec.submodule_search_locations)[0]))


def nvidia_lib_dirs(site_packages: str) -> list:
    """CUDA 13 wheels: nvidia/cu13/lib and nvidia/cudnn/lib; CUDA 12 wheels: one nvidia/<component>/lib each."""
    return sorted(d for d in glob.glob(os.path.join(site_packages, "nvidia", "*", "lib")) if os.path.isdir(d))


def parse_ldd(text: str) -> tuple:
    """ldd output -> ({soname: path}, [sonames not found])."""
    resolved, missing = {}, []
    for line in text.splitlines():
        m = LDD_LINE.match(line)
        if not m:
            continue
        name, target = m.group(1), m.group(2)
        if target == "not found":
            missing.append(name)
        elif target.startswith("/"):
            resolved[name] = target
    return resolved, missing


def ldconfig_cache() -> dict:
    try:
        out = subprocess.run(["ldconfig", "-p"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                             universal_newlines=True, check=False).stdout
    except OSError:
        return {}
    cache = {}
    for line in out.splitlines():
        m = re.match(r"^\s*(\S+)\s+\(([^)]*)\)\s+=>\s+(\S+)", line)
        if m and "x86-64" in m.group(2):
            cache.setdefault(m.group(1), m.group(3))
    return cache


def locate(soname: str, search_dirs: list, cache: dict) -> str | None:
    """Where dlopen(soname) would find a library: the search folders, then the ld.so cache, then the defaults."""
    for d in search_dirs:
        if os.path.exists(os.path.join(d, soname)):
            return os.path.join(d, soname)
    if soname in cache:
        return cache[soname]
    return next((os.path.join(d, soname) for d in SYSTEM_DIRS if os.path.exists(os.path.join(d, soname))), None)


def cudnn_cuda_major(path: str) -> int | None:
    """The CUDA major a libcudnn.so.9 was built for (cudnnGetCudartVersion, e.g. 13000 -> 13).

    Asked in a child process, so a wrong cuDNN never lands in the caller; the call needs no GPU."""
    code = ("import ctypes, sys; f = ctypes.CDLL(sys.argv[1]).cudnnGetCudartVersion; "
            "f.restype = ctypes.c_size_t; print(f())")
    try:
        out = subprocess.run([sys.executable, "-c", code, path], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                             universal_newlines=True, timeout=60, check=False).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return int(out) // 1000 if out.isdigit() else None


def dlopened_libs(cuda_major: int | None) -> list:
    """What the CUDA provider dlopens, named as onnxruntime.preload_dlls() names them (cuFFT 12 is CUDA 13's)."""
    libs = ["libcudnn.so.9"]
    if cuda_major:
        libs += ["libcufft.so.%d" % (12 if cuda_major >= 13 else 11), "libnvrtc.so.%d" % cuda_major]
    return libs


def check(site_packages: str | None = None, isolated: bool = False) -> Report:
    """Check the CUDA provider in `site_packages` (default: the onnxruntime this interpreter would import);
    isolated: ignore LD_LIBRARY_PATH and the ld.so cache (see the module docstring)."""
    sp = os.path.abspath(site_packages) if site_packages else default_site_packages()
    report = Report(site_packages=sp or "")
    if not sp:
        report.error = "onnxruntime is not importable by %s; pass --site-packages DIR" % sys.executable
        return report
    loader = next((p for p in LOADERS if os.path.exists(p)), None)
    if loader is None:
        report.error = "no dynamic loader at %s" % " or ".join(LOADERS)
        return report
    report.distributions = sorted(os.path.basename(p) for p in glob.glob(os.path.join(sp, "onnxruntime*.dist-info")))
    provider = os.path.join(sp, "onnxruntime", "capi", PROVIDER_LIB)
    if not os.path.isfile(provider):
        report.error = "no %s in %s (not an onnxruntime-gpu install?)" % (PROVIDER_LIB, os.path.dirname(provider))
        return report

    report.lib_dirs = nvidia_lib_dirs(sp)
    inherited = [] if isolated else [d for d in os.environ.get("LD_LIBRARY_PATH", "").split(":") if d]
    search = report.lib_dirs + [d for d in inherited if d not in report.lib_dirs]
    env = dict(os.environ, LD_LIBRARY_PATH=":".join(search), LD_TRACE_LOADED_OBJECTS="1")
    command = [loader] + (["--inhibit-cache"] if isolated else [])

    def ldd(path: str) -> None:
        out = subprocess.run(command + [path], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             universal_newlines=True, check=False).stdout
        resolved, missing = parse_ldd(out)
        report.resolved.update(resolved)
        for name in missing:
            report.missing.setdefault(name, set()).add(os.path.basename(path))

    ldd(provider)
    cuda_major = next((int(m.group(1)) for n in list(report.resolved) + list(report.missing)
                       for m in [re.match(r"libcudart\.so\.(\d+)$", n)] if m), None)
    cache = {} if isolated else ldconfig_cache()
    for soname in dlopened_libs(cuda_major):
        where = locate(soname, search, cache)
        if where is None:
            report.missing.setdefault(soname, set()).add(PROVIDER_LIB + " (dlopen)")
            continue
        report.resolved[soname] = where
        ldd(where)
        if soname.startswith("libcudnn"):
            built_for = cudnn_cuda_major(where) if cuda_major else None
            report.notes.append("cuDNN %s is built for CUDA %s; the provider needs CUDA %s"
                                % (where, built_for or "?", cuda_major or "?"))
            if built_for is not None and built_for != cuda_major:
                report.missing.setdefault("%s for CUDA %d (found one for CUDA %d)" % (soname, cuda_major, built_for),
                                          set()).add(PROVIDER_LIB + " (dlopen)")
            for sub in sorted(glob.glob(os.path.join(os.path.dirname(where), "libcudnn_*.so.9"))):
                report.resolved[os.path.basename(sub)] = sub  # cuDNN dlopens these from its own folder
                ldd(sub)
    for name in DRIVER_LIBS:
        report.resolved.pop(name, None)
    return report


def main(argv: list | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--site-packages", metavar="DIR", help="the folder holding onnxruntime and the nvidia/* wheels")
    ap.add_argument("--isolated", action="store_true",
                    help="ignore LD_LIBRARY_PATH and the ld.so cache: only the wheels and the loader's default folders")
    ap.add_argument("-v", "--verbose", action="store_true", help="print every resolved library too")
    args = ap.parse_args(argv)
    report = check(args.site_packages, args.isolated)
    if report.error is None:
        print("site-packages: %s" % report.site_packages)
        print("onnxruntime distributions: %s" % (", ".join(report.distributions) or "(none found)"))
        print("nvidia lib dirs: %s" % (" ".join(os.path.relpath(d, report.site_packages) for d in report.lib_dirs)
                                       or "(none: no nvidia-* wheels installed)"))
        for note in report.notes:
            print(note)
        if args.verbose:
            for name in sorted(report.resolved):
                print("  ok      %-40s %s" % (name, report.resolved[name]))
        for name in sorted(report.missing):
            print("  %-7s %s => not found   (needed by %s)" % ("driver" if name in DRIVER_LIBS else "MISSING", name,
                                                              ", ".join(sorted(report.missing[name]))))
    print(report.summary())
    return 2 if report.error else 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
