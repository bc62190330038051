"""The Dockerfile (no docker engine here, so it is read, not built): CUDA runtime base, onnxruntime-gpu
and every package the app imports, no torch in the final image, the bundle inside, non-root user,
EXPOSE 7860, HEALTHCHECK, bundle path and port from the environment."""
from __future__ import annotations

import ast
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

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


def pip_packages(steps) -> set[str]:
    """Distribution names installed by `pip install` in these steps."""
    names = set()
    for word, rest in steps:
        if word != "RUN":
            continue
        for command in re.split(r"&&|;", rest):
            tokens = shlex.split(command)
            if len(tokens) >= 2 and tokens[0] in ("pip", "pip3") and tokens[1] == "install":
                for token in tokens[2:]:
                    if not token.startswith("-"):
                        names.add(re.split(r"[<>=!~\[ ]", token)[0].lower())
                    elif token in ("-r", "--requirement"):
                        names.add("-r")
    return names


def test_base_image_is_cuda_runtime(stages):
    image = stages[-1][0].split()[0]
    assert re.fullmatch(r"nvidia/cuda:12\.[\d.]+-cudnn(\d*)-runtime-ubuntu\d+\.\d+", image), image


def test_final_image_has_onnxruntime_gpu_and_no_torch(stages):
    packages = pip_packages(final(stages))
    assert "onnxruntime-gpu" in packages and "gradio" in packages
    assert not {"torch", "torchvision", "open-clip-torch", "timm", "onnxruntime", "-r"} & packages
    for word, rest in final(stages):
        assert not (word == "RUN" and "torch" in rest), rest


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
    assert any(word == "RUN" and f"useradd" in rest and users[-1] in rest for word, rest in steps)
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
                if source != "assets/msrc21_default.pt":  # the default model may not be trained yet
                    assert (ROOT / source).exists(), source
