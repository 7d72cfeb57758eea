"""The repository's kernels/ folder never shadows the `kernels` distribution (which transformers
>= 5.25 imports at start-up), and it still ships as `workbench_kernels`.

kernels/ has no __init__.py, so seen from the repository root (the current directory comes first on
sys.path under `python -m` and `python -c`) it is a PEP 420 namespace portion, and a regular package
later on sys.path wins `import kernels`. Each check runs a fresh interpreter from the repository root.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_from(cwd: Path, code: str, *path: Path) -> subprocess.CompletedProcess:
    """`python -c code` in `cwd`, with `path` on PYTHONPATH: after the current directory, before site-packages
    (and before what PYTHONPATH already held)."""
    inherited = [os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([*(str(p) for p in path), *inherited])}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def fake_distribution(where: Path) -> Path:
    """A regular package named `kernels`, as the distribution installs it."""
    (where / "kernels").mkdir(parents=True)
    (where / "kernels" / "__init__.py").write_text("WHO = 'the kernels distribution'\n")
    return where


def test_the_folder_is_a_namespace_portion():
    assert (ROOT / "kernels").is_dir() and not (ROOT / "kernels" / "__init__.py").exists()


def test_import_kernels_from_the_repository_root_gives_the_distribution(tmp_path):
    site = fake_distribution(tmp_path / "site")
    code = ("import kernels, workbench_kernels.table as t, workbench\n"
            "print(kernels.WHO); print(kernels.__file__); print(t.select('cpu').name); print(t.__file__)")
    done = run_from(ROOT, code, site)
    assert done.returncode == 0, done.stderr
    who, where, backend, table = done.stdout.splitlines()
    assert who == "the kernels distribution" and Path(where) == site / "kernels" / "__init__.py"
    assert backend == "torch" and Path(table) == ROOT / "kernels" / "table.py"  # ours, beside it


def test_a_regular_package_in_the_root_would_shadow_it(tmp_path):
    """The control: the old layout (kernels/__init__.py in the root) wins over the distribution,
    which is what the namespace portion avoids."""
    site = fake_distribution(tmp_path / "site")
    old_root = tmp_path / "old_root"
    (old_root / "kernels").mkdir(parents=True)
    (old_root / "kernels" / "__init__.py").write_text("WHO = 'the repository folder'\n")
    done = run_from(old_root, "import kernels; print(kernels.WHO)", site)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "the repository folder"


def test_the_cli_starts_from_the_repository_root_beside_the_distribution(tmp_path):
    site = fake_distribution(tmp_path / "site")
    done = run_from(ROOT, "import sys, runpy; sys.argv = ['workbench', '--help']; "
                          "runpy.run_module('workbench', run_name='__main__')", site)
    assert done.returncode == 0, done.stderr
    assert "usage: workbench" in done.stdout


def _installed_kernels_distribution() -> importlib.metadata.Distribution | None:
    try:
        return importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        return None


@pytest.mark.skipif(_installed_kernels_distribution() is None,
                    reason="the `kernels` distribution is not installed (it comes with transformers >= 5.25)")
def test_the_installed_distribution_wins_from_the_repository_root():
    dist = _installed_kernels_distribution()
    installed = Path(dist.locate_file("kernels/__init__.py")).resolve()
    done = run_from(ROOT, "import kernels, transformers; print(kernels.__file__)")
    assert done.returncode == 0, done.stderr
    assert Path(done.stdout.strip()).resolve() == installed


@pytest.mark.slow
def test_a_built_wheel_ships_the_kernels_as_workbench_kernels(tmp_path):
    """Build the wheel from a clean copy of the sources (no stale build/ folder can leak in),
    install it into a folder of its own and import from there, away from the repository."""
    src = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for folder in ("workbench", "kernels"):
        shutil.copytree(ROOT / folder, src / folder, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-2000:]
    wheel, = (tmp_path / "dist").glob("cb_workbench-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"workbench_kernels/table.py", "workbench_kernels/naive.py", "workbench_kernels/torch_backend.py",
            "workbench_kernels/cpu_blocks.c", "workbench/__init__.py"} <= names
    assert not any(n.startswith("kernels/") for n in names), "the wheel would install a top-level `kernels`"
    packages = {p.relative_to(ROOT).as_posix() for p in (ROOT / "workbench").rglob("__init__.py")}
    assert packages <= names, f"packages missing from pyproject's list: {sorted(packages - names)}"
    assert "workbench_kernels/__init__.py" not in names
    target = tmp_path / "target"
    zipfile.ZipFile(wheel).extractall(target)  # what an install lays out
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    done = run_from(elsewhere, "import workbench_kernels.table as t, workbench_kernels.cpu_blocks as c\n"
                               "print(t.__file__); print(c.SOURCE.is_file())", target)
    assert done.returncode == 0, done.stderr
    where, has_source = done.stdout.splitlines()
    assert Path(where) == target / "workbench_kernels" / "table.py" and has_source == "True"
