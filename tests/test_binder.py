"""The Binder recipe, rebuilt here as far as this machine allows.

mybinder.org (repo2docker) copies the repository, installs binder/requirements.txt, runs
binder/postBuild from the repository root, and opens JupyterLab on notebook 1. This test does the
same in a fresh virtual environment made only from binder/'s files, then runs notebook 1 under
nbval. Two differences, both forced by having no internet here:

* requirements.txt's extra index (the CPU torch index) is dropped: torch 2.13.0 (CPU) comes from
  this machine's local wheel instead, the same version the index serves;
* pytest and nbval are installed beside it, as the test harness (Binder itself does not need them);
  they bring ipykernel, which Binder's base environment already has, as it has JupyterLab.

pip's cache is left on, so a second run reuses what the first built.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = "notebooks/01_why_batching.ipynb"


def _repo_files() -> list[str]:
    """What a commit of the working tree would hold: tracked files plus untracked, non-ignored ones."""
    try:
        out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                             check=True, capture_output=True, text=True).stdout
        return [p for p in out.split("\0") if p and (ROOT / p).is_file()]
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: everything but the usual clutter
        skip = {".git", ".venv", "__pycache__", ".pytest_cache", ".ipynb_checkpoints", "build", "dist"}
        return [str(p.relative_to(ROOT)) for p in ROOT.rglob("*")
                if p.is_file() and not skip & set(p.relative_to(ROOT).parts) and not p.name.endswith(".egg-info")]


def _run(cmd: list[str], *, cwd: Path, env: dict[str, str], timeout: float) -> str:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    output = proc.stdout + proc.stderr
    print(f"$ {' '.join(cmd)}  ({time.perf_counter() - t0:.0f} s)")
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}:\n{output[-6000:]}"
    return output


@pytest.mark.slow
def test_binder_recipe_runs_notebook_1(tmp_path: Path) -> None:
    binder = ROOT / "binder"
    assert (binder / "requirements.txt").is_file() and (binder / "postBuild").is_file()
    assert os.access(binder / "postBuild", os.X_OK), "repo2docker runs postBuild only if it is executable"

    # The repository as Binder sees it (a copy, so that builds write nothing into the working tree).
    repo = tmp_path / "repo"
    for rel in _repo_files():
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, repo / rel)

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env.update(PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}", VIRTUAL_ENV=str(venv),
               WORKBENCH_CACHE=str(tmp_path / "cache"), TOKENIZERS_PARALLELISM="false",
               PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_COMPILE="1")  # no .pyc for torch's files: faster
    py = str(venv / "bin" / "python")
    try:
        lines = (repo / "binder" / "requirements.txt").read_text().splitlines()
        assert any("download.pytorch.org/whl/cpu" in line for line in lines), "the CPU torch index is missing"
        local = [line for line in lines if not line.strip().startswith(("--index-url", "--extra-index-url", "-i "))]
        (tmp_path / "requirements-local.txt").write_text("\n".join(local) + "\n")
        _run([py, "-m", "pip", "install", "-q", "-r", str(tmp_path / "requirements-local.txt")], cwd=repo, env=env,
             timeout=1200)
        built = _run(["bash", "binder/postBuild"], cwd=repo, env=env, timeout=1200)
        if shutil.which("cc") or shutil.which("gcc"):  # the installed package carries cpu_blocks.c and builds it
            assert "block GEMM for CPU decode steps: True" in built, built[-2000:]
        _run([py, "-m", "pip", "install", "-q", "pytest", "nbval"], cwd=repo, env=env, timeout=600)

        versions = _run([py, "-c", "import torch, workbench; print(torch.__version__, workbench.__file__)"],
                        cwd=tmp_path, env=env, timeout=300)
        assert versions.startswith("2.13.0") and "+cpu" in versions.split()[0], versions
        assert str(venv) in versions, f"workbench must come from the fresh environment: {versions}"

        out = _run([py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--nbval-lax", "--nbval-current-env",
                    NOTEBOOK], cwd=repo, env=env, timeout=900)
        assert " passed" in out and "failed" not in out, out[-3000:]
    finally:
        shutil.rmtree(venv, ignore_errors=True)
        shutil.rmtree(tmp_path / "cache", ignore_errors=True)
