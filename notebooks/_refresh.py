"""Re-run a tutorial notebook and keep outputs only where nbval checks them.

    python notebooks/_refresh.py notebooks/01_why_batching.ipynb [...]

Cells marked `# NBVAL_CHECK_OUTPUT` keep what they printed (nbval --nbval-lax compares
exactly those); every other cell is committed without outputs or execution counts, so
timings, plots and widgets never enter the repository.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import nbformat
from nbconvert.preprocessors import ExecutePreprocessor

MARK = "# NBVAL_CHECK_OUTPUT"


def refresh(path: Path, timeout: int = 600) -> float:
    nb = nbformat.read(path, as_version=4)
    t0 = time.perf_counter()
    ExecutePreprocessor(timeout=timeout, kernel_name="python3").preprocess(nb, {"metadata": {"path": str(path.parent)}})
    elapsed = time.perf_counter() - t0
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        cell.metadata.pop("execution", None)
        if MARK in cell.source:
            cell.outputs = [o for o in cell.outputs if o.output_type == "stream" and o.name == "stdout"]
            for o in cell.outputs:
                o.pop("execution_count", None)
            cell.execution_count = 1 if cell.outputs else None
        else:
            cell.outputs, cell.execution_count = [], None
    nbformat.write(nb, path)
    return elapsed


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        print(f"{arg}: ran in {refresh(Path(arg)):.0f} s")
