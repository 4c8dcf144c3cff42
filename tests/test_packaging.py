"""What a non-editable install contains: every package, the shipped configs with their energy tables, an
entry point that exists; and such an install runs from another folder (no checkout on the path)."""
from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

from onnx_graphs import save_small_classifier

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def test_every_package_is_listed():
    on_disk = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "tpusim").rglob("__init__.py")}
    assert set(PYPROJECT["tool"]["setuptools"]["packages"]) == on_disk | {"tpusim.configs"}


def test_the_console_script_names_a_function_that_exists():
    module, function = PYPROJECT["project"]["scripts"]["tpusim"].split(":")
    assert callable(getattr(importlib.import_module(module), function))


def test_a_built_package_runs_from_another_folder(tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    for folder in ("tpusim", "configs"):
        shutil.copytree(REPO / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    built = tmp_path / "site"
    # build_py is the step of a wheel build that lays out packages and package data; it needs no network
    subprocess.run([sys.executable, "-c", "from setuptools import setup; setup()", "-q", "build_py", "--build-lib",
                    str(built)], cwd=source, check=True, capture_output=True, timeout=120)
    shipped = built / "tpusim" / "configs"
    assert sorted(p.name for p in shipped.glob("*.yaml")) == sorted(p.name for p in (REPO / "configs").glob("*.yaml"))
    table = "energy/horowitz45.yaml"
    assert (shipped / table).read_bytes() == (REPO / "configs" / table).read_bytes()

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    save_small_classifier(elsewhere / "m.onnx")
    env = {**os.environ, "PYTHONPATH": str(built), "TPUSIM_WORKLOAD_CACHE": str(tmp_path / "cache")}
    result = subprocess.run([sys.executable, "-c", "import tpusim, sys; print(tpusim.__file__); "
                             "from tpusim.__main__ import main; sys.exit(main())", "run",
                             str(shipped / "tpu_v1.yaml"), "--model", "m.onnx", "--no-quantize", "--no-progress",
                             "--out", "out"], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == str(built / "tpusim" / "__init__.py")
    assert (elsewhere / "out" / "summary.json").is_file()

    # a copied config names its energy table relative to itself; the installed copy is found instead
    shutil.copy(shipped / "tpu_v1.yaml", elsewhere / "my.yaml")
    copied = subprocess.run([sys.executable, "-m", "tpusim", "run", "my.yaml", "--model", "m.onnx", "--no-quantize",
                             "--no-progress", "--out", "out-copied"], cwd=elsewhere, env=env, capture_output=True,
                            text=True, timeout=300)
    assert copied.returncode == 0, copied.stderr
    assert (elsewhere / "out-copied" / "summary.json").is_file()
