"""The Dockerfile, read (docker/smoke.sh builds and runs it): base images as build arguments, onnxruntime-gpu
pinned with CUDA libraries that all resolve, every package the app imports, no torch in the final image, the
bundle inside, non-root user, EXPOSE 7860, HEALTHCHECK, bundle path and port from the environment."""
from __future__ import annotations

import ast
import importlib.metadata
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from clipteacher.runtime import cuda_libs

ROOT = Path(__file__).resolve().parents[1]
# import name -> pip distribution, for the app's third-party imports
DISTRIBUTIONS = {"cv2": "opencv-python-headless", "PIL": "pillow", "onnxruntime": "onnxruntime-gpu", "gradio": "gradio",
                 "numpy": "numpy", "scipy": "scipy", "tokenizers": "tokenizers", "ftfy": "ftfy", "regex": "regex",
                 "threadpoolctl": "threadpoolctl"}
LAZY_IMPORTS = {"tokenizers"}  # imported inside clipteacher.runtime.bundle.Bundle.tokenize for MiniLM bundles
OWN = {"clipteacher"}
APP_MODULES = ("clipteacher.cli.app", "clipteacher.app.ui", "clipteacher.app.service", "clipteacher.runtime.bundle",
               "clipteacher.runtime.clip_tokenizer")


def instructions(text: str) -> list[tuple[str, str]]:
    """Dockerfile text -> [(INSTRUCTION, arguments)], continuation lines joined, comments dropped."""
    out, current = [], ""
    for line in text.splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.lstrip().startswith("#"):  # a comment inside a continued instruction
            continue
        current += line.rstrip()
        if current.endswith("\\"):
            current = current[:-1] + " "
            continue
        word, _, rest = current.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        current = ""
    return out


def env_pairs(arguments: str) -> dict[str, str]:
    return dict(token.split("=", 1) for token in shlex.split(arguments))


@pytest.fixture(scope="module")
def stages():
    """[(FROM arguments, [instructions])] per stage; ARG defaults before the first FROM are substituted."""
    steps = instructions((ROOT / "Dockerfile").read_text())
    args = {}
    result = []
    for word, rest in steps:
        if word == "ARG" and not result:
            name, _, default = rest.partition("=")
            args[name] = default
        elif word == "FROM":
            for name, value in args.items():
                rest = rest.replace("${" + name + "}", value).replace("$" + name, value)
            result.append((rest, []))
        elif result:
            result[-1][1].append((word, rest))
    return result


def final(stages) -> list[tuple[str, str]]:
    return stages[-1][1]


def pip_install_arguments(steps) -> list[str]:
    """The arguments of every `pip install` in these steps' RUN commands."""
    out = []
    for word, rest in steps:
        if word != "RUN":
            continue
        for command in re.split(r"&&|;", rest):
            tokens = shlex.split(command)
            if len(tokens) >= 2 and tokens[0] in ("pip", "pip3") and tokens[1] == "install":
                out += tokens[2:]
    return out


def pip_packages(steps) -> set[str]:
    """Distribution names installed by `pip install` in these steps ("-r" for a requirements file)."""
    return {"-r" if token in ("-r", "--requirement") else re.split(r"[<>=!~\[ ]", token)[0].lower()
            for token in pip_install_arguments(steps) if not token.startswith("-") or token in ("-r", "--requirement")}


def test_base_images_are_build_arguments_with_public_defaults():
    """Every stage's base is an ARG (docker/smoke.sh substitutes local images); the defaults are public Python
    images, and the app's is not a CUDA image: its CUDA libraries come from the pinned wheels."""
    steps = instructions((ROOT / "Dockerfile").read_text())
    first_from = next(i for i, (word, _) in enumerate(steps) if word == "FROM")
    defaults = dict(rest.partition("=")[::2] for word, rest in steps[:first_from] if word == "ARG")
    bases = [rest.split()[0] for word, rest in steps if word == "FROM"]
    assert bases == ["${PY_IMAGE}", "${APP_BASE_IMAGE}"]
    assert re.fullmatch(r"python:3\.1[0-9]-slim", defaults["PY_IMAGE"]), defaults
    assert re.fullmatch(r"python:3\.1[0-9]-slim", defaults["APP_BASE_IMAGE"]), defaults


def test_final_image_has_onnxruntime_gpu_and_no_torch(stages):
    packages = pip_packages(final(stages))
    assert "onnxruntime-gpu" in packages and "gradio" in packages
    assert not {"torch", "torchvision", "open-clip-torch", "timm", "onnxruntime", "-r"} & packages
    for word, rest in final(stages):
        assert not (word == "RUN" and "torch" in rest), rest


def installed_closure(requirements: list[str]) -> tuple[dict, set[str]]:
    """What `pip install <requirements>` puts in the image, taken from this environment's installed distributions
    (extras and markers evaluated): ({name: Distribution}, names some requirement constrains by version).
    Skips when a distribution is not installed here or its version does not satisfy a requirement."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    todo = [(Requirement(r), "the Dockerfile") for r in requirements]
    found, extras_done, versioned = {}, set(), set()
    while todo:
        req, by = todo.pop()
        name = canonicalize_name(req.name)
        versioned |= {name} if req.specifier else set()
        try:
            dist = found.get(name) or importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            pytest.skip(f"{name} (required by {by}) is not installed here, so the image's set cannot be assembled")
        if not req.specifier.contains(dist.version, prereleases=True):
            pytest.skip(f"installed {name} {dist.version} does not satisfy {req} (required by {by})")
        found[name] = dist
        for extra in {""} | set(req.extras):
            if (name, extra) in extras_done:
                continue
            extras_done.add((name, extra))
            for text in dist.requires or []:
                sub = Requirement(text)
                if sub.marker is None or sub.marker.evaluate({"extra": extra}):
                    todo.append((sub, f"{name}[{extra}]" if extra else name))
    return found, versioned


def assemble_site_packages(dists: dict, root: Path) -> Path:
    """A site-packages folder of these distributions' onnxruntime and nvidia files (symlinks) and their
    dist-info folder names: what the CUDA provider check looks at."""
    for dist in dists.values():
        (root / f"{dist.metadata['Name'].replace('-', '_')}-{dist.version}.dist-info").mkdir(parents=True, exist_ok=True)
        for file in dist.files or []:
            if file.parts[0] in ("onnxruntime", "nvidia"):
                target = root / file
                target.parent.mkdir(parents=True, exist_ok=True)
                target.unlink(missing_ok=True)  # a later distribution overwrites, as pip does
                target.symlink_to(file.locate())
    return root


def test_onnxruntime_gpu_is_pinned_with_its_cuda_extras_as_in_requirements(stages):
    pins = [t for t in pip_install_arguments(final(stages)) if t.startswith("onnxruntime-gpu")]
    assert len(pins) == 1 and re.fullmatch(r"onnxruntime-gpu\[cuda,cudnn\]==[\d.]+", pins[0]), pins
    version = pins[0].split("==")[1]
    assert f"onnxruntime-gpu=={version}" in (ROOT / "requirements.txt").read_text().split()


def test_every_cuda_provider_library_resolves_in_the_final_stage(stages, tmp_path):
    """The final stage's pip requirements, assembled from this environment's installed wheels, give the CUDA
    provider every library it links or dlopens; only the driver's libcuda.so.1 may be missing. Checked
    --isolated: the wheels and the loader's default folders only, whatever CUDA this machine has elsewhere."""
    dists, _ = installed_closure([t for t in pip_install_arguments(final(stages)) if not t.startswith("-")])
    report = cuda_libs.check(str(assemble_site_packages(dists, tmp_path / "site-packages")), isolated=True)
    assert report.error is None, report.error
    assert report.ok, report.summary()
    assert "libcudnn.so.9" in report.resolved and "libcublasLt.so.13" in report.resolved


def test_cuda_libraries_are_held_to_one_cuda_major(stages):
    """Each nvidia-* wheel in the final stage is constrained by some versioned requirement; a bare `nvidia-cublas`
    could resolve to a later CUDA major whose libcublas.so.N the provider does not link."""
    dists, versioned = installed_closure([t for t in pip_install_arguments(final(stages)) if not t.startswith("-")])
    loose = sorted(name for name in dists if name.startswith("nvidia-") and name not in versioned)
    assert not loose, f"pin these to the provider's CUDA major in the Dockerfile: {loose}"


def app_source_files() -> list[Path]:
    """The repository files a fresh interpreter loads when it imports the app (and the runtime's lazy tokenizer)."""
    code = (f"import sys, json, {', '.join(APP_MODULES)}\n"
            "print(json.dumps(sorted(m.__file__ for n, m in list(sys.modules.items())\n"
            "      if n.split('.')[0] == 'clipteacher' and getattr(m, '__file__', None))))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    return [Path(p) for p in json.loads(res.stdout.strip().splitlines()[-1])]


def test_app_imports_are_installed(stages):
    """Every third-party module the app loads (at import, plus the lazy ones) has its package in the final image."""
    imported = set(LAZY_IMPORTS)
    for path in app_source_files():
        for node in ast.parse(path.read_text()).body:  # module level: what importing the file needs
            if isinstance(node, ast.Import):
                imported |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.split(".")[0])
    third_party = imported - set(sys.stdlib_module_names) - OWN
    assert "torch" not in third_party
    unknown = third_party - set(DISTRIBUTIONS)
    assert not unknown, f"add these imports to DISTRIBUTIONS and the Dockerfile: {unknown}"
    missing = {DISTRIBUTIONS[m] for m in third_party} - pip_packages(final(stages))
    assert not missing, f"the Dockerfile's final stage does not install {missing}"


def test_app_stage_copies_exactly_what_the_app_imports(stages):
    """Each package file the app loads is copied into the final image, and nothing of clipteacher beyond them."""
    copied = []
    for word, rest in final(stages):
        if word == "COPY" and not rest.startswith("--from="):
            copied += [ROOT / src for src in shlex.split(rest)[:-1] if src.startswith("clipteacher")]
    def covered(path: Path) -> bool:
        return any(path == c or c in path.parents for c in copied)
    needed = [p.resolve() for p in app_source_files()]
    assert all(covered(p) for p in needed), [str(p.relative_to(ROOT)) for p in needed if not covered(p)]
    for c in copied:  # every copied file or folder holds something the app imports
        assert any(p == c or c in p.parents for p in needed), f"{c.relative_to(ROOT)} is copied but not imported"


def test_bundle_is_built_in_and_settable_by_environment(stages):
    steps = final(stages)
    env = {}
    for word, rest in steps:
        if word == "ENV":
            env.update(env_pairs(rest))
    assert env["PORT"] == "7860" and env["HOST"] == "0.0.0.0"
    copies = [rest for word, rest in steps if word == "COPY" and rest.startswith("--from=")]
    bundle_stage = [rest for rest, body in stages[:-1] if any("clipteacher-export" in r for w, r in body if w == "RUN")]
    assert bundle_stage, "no stage runs clipteacher-export"
    name = bundle_stage[0].split()[-1]
    dest = [c.split()[-1] for c in copies if c.startswith(f"--from={name} ")]
    workdir = [rest for word, rest in steps if word == "WORKDIR"][-1]
    assert dest and os.path.normpath(os.path.join(workdir, dest[0])) == env["CLIPTEACHER_BUNDLE"]
    # the app's entry point reads exactly these variables
    run_py = (ROOT / "clipteacher" / "cli" / "app.py").read_text()
    for var in ("CLIPTEACHER_BUNDLE", "PORT", "HOST"):
        assert f'os.environ.get("{var}"' in run_py


def test_user_port_healthcheck_and_command(stages):
    steps = final(stages)
    users = [rest for word, rest in steps if word == "USER"]
    assert users and users[-1] not in ("root", "0")
    assert any(word == "RUN" and "useradd" in rest and users[-1] in rest for word, rest in steps)
    assert ("EXPOSE", "7860") in steps
    health = [rest for word, rest in steps if word == "HEALTHCHECK"]
    assert len(health) == 1 and "CMD" in health[0] and "PORT" in health[0] and "127.0.0.1" in health[0]
    cmd = [rest for word, rest in steps if word == "CMD"]
    assert cmd and json.loads(cmd[-1]) == ["python", "app/run.py"]


def test_copied_sources_exist_and_are_not_ignored(stages):
    ignored = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    assert {".git", "runs", "bundles"} <= set(ignored)
    for _, body in stages:
        for word, rest in body:
            if word != "COPY" or rest.startswith("--from="):
                continue
            for source in shlex.split(rest)[:-1]:
                assert not any(source == i or source.startswith(i + "/") for i in ignored), source
                assert (ROOT / source).exists(), source


def test_smoke_pip_settings_carry_the_files_they_name(tmp_path):
    """A pip config with a constraint line (as on this machine) names a host file; the build sees only the
    mounted folder, so the file must be copied there and the setting point at it (the build failed with
    'Could not open requirements file' before)."""
    from helpers import smoke_helpers as helpers

    host = tmp_path / "host"
    host.mkdir()
    (host / "constraints.txt").write_text("torch<=2.14.1\n")
    (host / "ca.crt").write_text("certificate\n")
    (host / "reqs.txt").write_text("six\n")
    out = tmp_path / "out"
    out.mkdir()
    listing = (f"global.constraint='{host / 'constraints.txt'}'\n:env:.cert='{host / 'ca.crt'}'\n"
               f"global.requirement='{host / 'reqs.txt'}'\nglobal.find-links='/opt/wheels'\n")
    helpers.pip_conf(str(out), listing)
    conf = dict(line.split(" = ", 1) for line in (out / "pip.conf").read_text().splitlines()[1:])
    for key, text in (("constraint", "torch<=2.14.1\n"), ("requirement", "six\n"), ("cert", "certificate\n")):
        inside = conf[key]
        assert inside.startswith(helpers.CERT_DIR_IN_BUILD + "/") and str(host) not in inside
        assert (out / Path(inside).name).read_text() == text  # the copy lies in the mounted folder
    assert conf["find-links"] == "/opt/wheels"


@pytest.mark.parametrize("script", ["docker/smoke.sh", "bench/live.py", "bench/serve.py"])
def test_repository_files_the_harness_names_exist(script):
    """Paths into the repository that a harness script spells out (`$repo/...`, ROOT / "a" / "b") exist: the
    smoke test's API check sent assets/examples/farm.jpg after the examples had moved into the package."""
    text = (ROOT / script).read_text()
    named = re.findall(r'\$repo/([\w./-]+\.\w+)', text)
    named += ["/".join(parts) for parts in
              (re.findall(r'"([\w.-]+)"', m) for m in re.findall(r'ROOT((?:\s*/\s*"[\w.-]+")+)', text))]
    assert named, f"{script}: no repository paths found (the pattern no longer fits the script)"
    missing = [p for p in named if not (ROOT / p).exists()]
    assert not missing, f"{script} names {missing}, which are not in the repository"
