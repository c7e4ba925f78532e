"""Packaging: the repository's folders install under `lightning_mpipemoe` and never shadow an
installed distribution of the same name (Hugging Face's `kernels`, torchtune's `recipes`, ...).

The top-level `kernels/`, `hf_models/`, `recipes/` and `conf/` carry no `__init__.py`: a folder
without one is only a namespace portion, and Python's path finder takes a regular package found
anywhere on `sys.path` over it, whatever comes first. `lightning_mpipemoe/<folder>` are
symlinks to them (the package's view in a clone, editable install included); a wheel holds
the files themselves under `lightning_mpipemoe/`.
"""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("kernels", "hf_models", "recipes", "conf")


def _python(code: str, cwd: Path, **env: str) -> list[str]:
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, env={**os.environ, **env}, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.split()


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


def test_repository_folders_are_not_regular_packages():
    for folder in FOLDERS:
        assert not (ROOT / folder / "__init__.py").exists(), f"{folder}/__init__.py would shadow an installed {folder!r}"
        link = ROOT / "lightning_mpipemoe" / folder
        assert link.is_symlink() and link.resolve() == (ROOT / folder).resolve(), f"{link} must link to ../{folder}"


def test_wheel_installs_folders_under_the_namespace(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    # lightning_mpipemoe_cli.py: the console scripts' front, importable without the package's
    # __init__ (which imports torch, Lightning and transformers); no other distribution uses the name.
    assert top_level == {"lightning_mpipemoe", "lightning_mpipemoe_cli.py"}, f"unexpected top-level names {top_level}"
    for module in ("kernels/api.py", "kernels/ops.py", "hf_models/api.py", "recipes/finetune.py", "conf/finetune.yaml",
                   "conf/model/mixtral_tiny.yaml", "recipes/corpus/village.txt", "moe/executor.py"):
        assert f"lightning_mpipemoe/{module}" in names, module


def test_installed_wheel_imports_outside_the_repository(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target), str(wheel)],
        check=True,
        capture_output=True,
    )
    code = (
        "import lightning_mpipemoe, lightning_mpipemoe.kernels.api as k, lightning_mpipemoe.hf_models.api as h\n"
        "from lightning_mpipemoe.recipes.finetune import CONFIG_DIR\n"
        "import lightning_mpipemoe_cli; assert lightning_mpipemoe_cli.CONFIG_DIR == CONFIG_DIR\n"
        "import os; assert os.path.isfile(os.path.join(CONFIG_DIR, 'finetune.yaml')), CONFIG_DIR\n"
        "print(lightning_mpipemoe.__file__, k.__file__, h.__file__, CONFIG_DIR)"
    )
    path = os.pathsep.join([str(target), os.environ.get("PYTHONPATH", "")])
    files = _python(code, tmp_path, PYTHONPATH=path)
    assert all(f.startswith(str(target)) for f in files), f"imported from the wrong place: {files}"


def _hf_kernels_installed() -> bool:
    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


@pytest.mark.skipif(
    not _hf_kernels_installed(),
    reason="Hugging Face's `kernels` is not installed (transformers < 5.25 does not need it); "
    "test_no_folder_shadows_an_installed_package_of_its_name covers `kernels` with a stand-in then",
)
def test_installed_kernels_wins_from_the_repository_root():
    """From the clone's root (`''` first on sys.path, as `python -m` and `python -c` put it),
    transformers' import of Hugging Face's `kernels` and ours both work."""
    code = (
        "import sys; assert sys.path[0] in ('', '.') or sys.path[0] == __import__('os').getcwd(), sys.path[:2]\n"
        "import transformers.activations, lightning_mpipemoe, kernels\n"
        "from transformers.integrations import hub_kernels\n"
        "import lightning_mpipemoe.kernels.api as ours\n"
        "print(kernels.__file__, ours.__file__)"
    )
    theirs, ours = _python(code, ROOT)
    assert not Path(theirs).resolve().is_relative_to(ROOT / "kernels"), f"`import kernels` found ours: {theirs}"
    assert Path(theirs).parent.parent.name in ("site-packages", "dist-packages"), theirs
    assert Path(ours).resolve() == ROOT / "kernels" / "api.py"


def test_no_folder_shadows_an_installed_package_of_its_name(tmp_path):
    """Stand-ins for installed `recipes`, `hf_models` and `conf` (regular packages on sys.path
    after the repository root) are what those names import. (`kernels` is the real one above,
    or a stand-in too where Hugging Face's is not installed.)"""
    names = tuple(f for f in FOLDERS if f != "kernels" or not _hf_kernels_installed())
    site = tmp_path / "site"
    for folder in names:
        (site / folder).mkdir(parents=True)
        (site / folder / "__init__.py").write_text(f"ORIGIN = 'installed {folder}'\n")
    code = (
        "import importlib, lightning_mpipemoe\n"
        f"print(*[importlib.import_module(n).ORIGIN.replace(' ', '-') for n in {names!r}])"
    )
    path = os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])
    assert _python(code, ROOT, PYTHONPATH=path) == [f"installed-{f}" for f in names]
