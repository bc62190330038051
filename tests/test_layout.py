"""The package layout: torch-free rooms stay torch-free, entry points are installed, choice fields fail early."""
from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
import tomllib
from typing import Literal, get_args, get_origin, get_type_hints

import pytest

from clipteacher import config as config_module
from clipteacher.config import Config, ConfigError, apply_overrides
from helpers import ROOT

TORCH_FREE = ["clipteacher", "clipteacher.io", "clipteacher.request", "clipteacher.runtime.resolve", "clipteacher.pseudo", "clipteacher.pseudo.vis", "clipteacher.runtime",
              "clipteacher.runtime.clip_tokenizer", "clipteacher.app.service", "clipteacher.app.ui",
              "clipteacher.cli.app", "clipteacher.batch", "clipteacher.cli.predict", "clipteacher.serve.api", "clipteacher.serve.client",
              "clipteacher.export.triton"]
SCRIPTS = {"clipteacher-train": "train", "clipteacher-eval": "evaluate", "clipteacher-pseudo": "pseudo_labels",
           "clipteacher-export": "export", "clipteacher-app": "app", "clipteacher-predict": "predict"}


def run_python(code: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=timeout)


def test_torch_free_modules_do_not_import_torch():
    code = (f"import sys, {', '.join(TORCH_FREE)}\n"
            "heavy = [m for m in ('torch', 'torchvision', 'timm', 'open_clip', 'transformers') if m in sys.modules]\n"
            "print(heavy); sys.exit(1 if heavy else 0)")
    res = run_python(code)
    assert res.returncode == 0, res.stdout + res.stderr[-2000:]


INFERENCE = ["clipteacher/models", "clipteacher/predictor.py", "clipteacher/runtime", "clipteacher/app",
             "clipteacher/request.py", "clipteacher/config.py", "clipteacher/checkpoint.py", "clipteacher/io.py",
             "clipteacher/prompts.py", "clipteacher/batch.py", "clipteacher/cli/predict.py", "clipteacher/cli/app.py",
             "clipteacher/serve", "clipteacher/export/triton.py"]


def test_ray_front_ends_do_not_import_torch():
    pytest.importorskip("ray", reason="Ray is not installed")
    code = ("import sys, clipteacher.serve.ray_serve, clipteacher.serve.ray_data\n"
            "heavy = [m for m in ('torch', 'timm', 'open_clip', 'transformers') if m in sys.modules]\n"
            "print(heavy); sys.exit(1 if heavy else 0)")
    res = run_python(code)
    assert res.returncode == 0, res.stdout + res.stderr[-2000:]


def imported_modules(path) -> set[str]:
    """Every module a file imports, at its top or inside functions (absolute imports)."""
    import ast

    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
    return found


@pytest.mark.parametrize("where", INFERENCE)
def test_inference_never_imports_training_code(where):
    """Layers point one way: models, predictor, runtime, app (and what they stand on) never import
    clipteacher.train, not even lazily inside a function."""
    target = ROOT / where
    files = sorted(target.rglob("*.py")) if target.is_dir() else [target]
    offenders = {str(f.relative_to(ROOT)): sorted(m for m in imported_modules(f) if m.startswith("clipteacher.train"))
                 for f in files}
    assert not {f: m for f, m in offenders.items() if m}


def test_importing_the_predictor_loads_no_training_module():
    res = run_python("import clipteacher.predictor, sys; "
                     "sys.exit(1 if any(m.startswith('clipteacher.train') for m in sys.modules) else 0)")
    assert res.returncode == 0, res.stderr[-2000:]


def test_no_sys_path_edits_outside_tests():
    offenders = [str(p.relative_to(ROOT)) for folder in ("clipteacher", "training", "export", "app", "bench")
                 for p in (ROOT / folder).rglob("*.py") if "sys.path" in p.read_text()]
    assert not offenders


def test_only_clipteacher_is_installed_and_scripts_point_at_mains():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["tool"]["setuptools"]["packages"]["find"]["include"] == ["clipteacher*"]
    assert project["project"]["scripts"] == {name: f"clipteacher.cli.{module}:main" for name, module in SCRIPTS.items()}


@pytest.mark.parametrize("script, module", [("training/run.py", "train"), ("training/evaluate.py", "evaluate"),
                                            ("training/pseudo_labels.py", "pseudo_labels"),
                                            ("export/run.py", "export"), ("app/run.py", "app")])
def test_entry_scripts_are_the_console_scripts(script, module):
    """Each `python <folder>/run.py` form runs the same main as its console script."""
    text = (ROOT / script).read_text()
    assert f"from clipteacher.cli.{module} import main" in text
    res = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert res.returncode == 0 and "usage:" in res.stdout, res.stderr[-2000:]


def choice_fields() -> list[tuple[str, tuple]]:
    """('section.field', allowed values) for every Literal field of the config."""
    out = []
    for name, hint in get_type_hints(Config).items():  # top-level choices (method)
        if get_origin(hint) is Literal:
            out.append((name, get_args(hint)))
    for section in dataclasses.fields(Config):
        if not dataclasses.is_dataclass(getattr(Config(), section.name)):
            continue
        hints = get_type_hints(getattr(config_module, type(getattr(Config(), section.name)).__name__))
        for name, hint in hints.items():
            if get_origin(hint) is Literal:
                out.append((f"{section.name}.{name}", get_args(hint)))
    return out


def test_every_choice_field_is_a_literal():
    found = {key for key, _ in choice_fields()}
    assert {"method", "maskclip.names", "data.kind", "teacher.kind", "teacher.mode", "teacher.conse_backbone", "glm.pooling", "plm.init",
            "plm.fusion", "plm.generator", "train.device"} <= found


@pytest.mark.parametrize("key, allowed", choice_fields())
def test_a_typo_in_a_choice_field_names_field_value_and_choices(key, allowed):
    with pytest.raises(ConfigError) as err:
        apply_overrides(Config(), [f"{key}={allowed[0]}x"])
    message = str(err.value)
    assert "\n" not in message and key in message and f"{allowed[0]}x" in message
    assert all(str(a) in message for a in allowed)
    if key == "method":  # zegclip needs a CLIP teacher (checked across fields)
        cfg = apply_overrides(Config(), ["teacher.kind=clip", f"{key}={allowed[-1]}"])
        assert cfg.method == allowed[-1]
        return
    cfg = apply_overrides(Config(), [f"{key}={allowed[-1]}"])  # every allowed value is accepted
    section, name = key.split(".")
    assert getattr(getattr(cfg, section), name) == allowed[-1]


def test_training_stops_on_a_typo_before_loading_anything():
    res = subprocess.run([sys.executable, "training/run.py", "--config", "training/configs/msrc21.yaml",
                          "teacher.mode=cahced", "data.root=/nonexistent"], capture_output=True, text=True, cwd=ROOT,
                         timeout=120)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1, res.stderr
    assert re.search(r"teacher\.mode.*online.*cached.*cahced", lines[0]), lines[0]


def test_docs_and_model_folders_name_no_machine_paths():
    """Commands anyone can run, not folders of the machine that trained a model (/tmp/..., /work/..., home dirs)."""
    files = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "assets").rglob("README.md")),
             *sorted((ROOT / "assets").rglob("config.json"))]
    pattern = re.compile(r"(?<![\w.])/(tmp|work|root|home|var/tmp)/\w")
    offenders = [f"{f.relative_to(ROOT)}:{i}" for f in files
                 for i, line in enumerate(f.read_text().splitlines(), 1) if pattern.search(line)]
    assert not offenders, offenders


def test_repository_paths_named_in_scripts_exist():
    """A default like ROOT / "assets" / "default.pt" outlives the file it named (bench/int8.py did, after the
    default model became a folder): every repository path spelled that way in bench/ and training/ must exist."""
    import re

    missing = []
    for script in sorted([*ROOT.glob("bench/*.py"), *ROOT.glob("training/**/*.py")]):
        for parts in re.findall(r'ROOT((?:\s*/\s*"[^"]+")+)', script.read_text()):
            path = ROOT.joinpath(*re.findall(r'"([^"]+)"', parts))
            if not path.exists():
                missing.append(f"{script.relative_to(ROOT)}: {path.relative_to(ROOT)}")
    assert not missing, missing


def test_docs_hold_no_control_characters():
    """LaTeX written through a non-raw Python string loses its backslashes: '\\text' becomes a tab and 'ext',
    '\\big' a backspace and 'ig' (docs/METHOD.md's anchor formula did)."""
    files = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "assets").rglob("README.md"))]
    offenders = [f"{f.relative_to(ROOT)}:{i}" for f in files
                 for i, line in enumerate(f.read_text().splitlines(), 1) if re.search(r"[\x00-\x08\x0b-\x1f\x7f]", line)]
    assert not offenders, offenders
