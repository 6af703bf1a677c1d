"""Execute the tutorials (``docs/tutorials/*.py``, jupytext percent format) into notebooks with their outputs.

    python docs/execute_tutorials.py                  # every tutorial, full settings (a few minutes on 2 cores)
    python docs/execute_tutorials.py own_model        # one of them
    PYRO_LVM_TUTORIAL_TINY=1 python docs/execute_tutorials.py --output /tmp/nb   # tiny settings, elsewhere

The ``.py`` files are the source; the ``.ipynb`` files beside them are what the site renders (mkdocs-jupyter,
without executing, so ``mkdocs build`` stays fast). Run this after editing a tutorial: ``tests/test_docs.py`` fails
when a notebook's code no longer matches its source. Each notebook runs in a fresh kernel with one torch thread,
in a temporary working directory (nothing is written beside the sources but the notebooks).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

TUTORIALS = Path(__file__).resolve().parent / "tutorials"

#: the order of the site's navigation
ORDER = ("compare_families", "inspect_and_trust", "own_model")


def execute(source: Path, output: Path, timeout: int = 1800) -> float:
    """Run ``source`` as a notebook in a fresh kernel; write it, outputs included, to ``output``; return seconds."""
    import jupytext
    import nbformat
    from nbclient import NotebookClient

    notebook = jupytext.read(source)
    notebook.metadata.pop("jupytext", None)
    notebook.metadata["kernelspec"] = {"display_name": "Python 3", "language": "python", "name": "python3"}
    env_threads = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    os.environ.update(env_threads)  # inherited by the kernel
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as cwd:
        client = NotebookClient(notebook, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": cwd}})
        client.execute()
    seconds = time.perf_counter() - started
    for cell in notebook.cells:  # outputs only; no execution timestamps, so a re-run changes only what changed
        cell.metadata.pop("execution", None)
        if cell.cell_type == "code":  # tqdm's note that ipywidgets is not installed is not the tutorial's output
            cell.outputs = [o for o in cell.outputs if not (o.output_type == "stream" and o.name == "stderr"
                                                            and "IProgress not found" in o.text)]
    output.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(notebook, output)
    return seconds


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("names", nargs="*", help=f"tutorials to run (default: all of {', '.join(ORDER)})")
    p.add_argument("--output", type=Path, default=TUTORIALS, help="directory for the notebooks (default: beside)")
    a = p.parse_args(argv)
    for name in a.names or ORDER:
        seconds = execute(TUTORIALS / f"{name}.py", a.output / f"{name}.ipynb")
        print(f"{name}: {seconds:.0f} s -> {a.output / (name + '.ipynb')}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
