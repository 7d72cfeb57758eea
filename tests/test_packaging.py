"""The wheel carries what an installed workbench needs outside the checkout.

Builds the wheel from a copy of the tracked files (pip, no build isolation: this environment's
setuptools, nothing downloaded) and reads it: every package of the source tree is in it (a package
left out of pyproject's explicit list would import from a checkout and fail from the wheel), the C
source the CPU block GEMM compiles on first use is package data, the `workbench` command is an entry
point, and the licence is the SPDX expression with its text. Installing it and running
`python -m workbench demo` outside the checkout was checked by hand (see CHANGELOG.md's packaging line).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).absolute().parents[1]


def _tracked_copy(dest: Path) -> None:
    """Only what git tracks: the wheel must not depend on a local build or cache."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, check=True, capture_output=True).stdout
    for rel in filter(None, files.decode().split("\0")):
        if (ROOT / rel).is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, dest / rel)


def test_wheel_carries_every_package_and_the_c_source(tmp_path: Path) -> None:
    src = tmp_path / "src"
    _tracked_copy(src)
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("cb_workbench-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())

    packages = {p.parent.relative_to(src).as_posix() for p in (src / "workbench").rglob("__init__.py")}
    missing = sorted(p for p in packages if f"{p}/__init__.py" not in names)
    assert not missing, f"packages of the source tree missing from the wheel: {missing}"
    kernels = {f"workbench_kernels/{p.name}" for p in (src / "kernels").iterdir() if p.suffix in (".py", ".c")}
    assert kernels <= names, f"kernel files missing from the wheel: {sorted(kernels - names)}"
    assert "workbench_kernels/cpu_blocks.c" in names

    dist_info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
    metadata = zipfile.ZipFile(wheel).read(f"{dist_info}/METADATA").decode()
    assert "License-Expression: Apache-2.0" in metadata, metadata[:1500]
    assert f"{dist_info}/licenses/LICENSE" in names
    entry_points = zipfile.ZipFile(wheel).read(f"{dist_info}/entry_points.txt").decode()
    assert "workbench = workbench.cli:main" in entry_points
