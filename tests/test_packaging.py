"""The non-editable install: folders of the repository install under `lightning_mpipemoe`."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", str(out), str(ROOT)],
        check=True,
        capture_output=True,
    )
    (path,) = out.glob("lightning_mpipemoe-*.whl")
    return path


def test_wheel_installs_folders_under_the_namespace(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert top_level == {"lightning_mpipemoe"}, f"unexpected top-level packages {top_level}"
    for module in ("kernels/__init__.py", "hf_models/__init__.py", "recipes/__init__.py", "moe/executor.py"):
        assert f"lightning_mpipemoe/{module}" in names


def test_installed_wheel_imports_outside_the_repository(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target), str(wheel)],
        check=True,
        capture_output=True,
    )
    code = (
        "import lightning_mpipemoe, lightning_mpipemoe.kernels as k, lightning_mpipemoe.hf_models;"
        "print(lightning_mpipemoe.__file__); print(k.__file__)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env={"PYTHONPATH": str(target), "PATH": ""},
        capture_output=True, text=True, check=True,
    )
    files = result.stdout.split()
    assert all(f.startswith(str(target)) for f in files), f"imported from the wrong place: {files}"
