"""The course: every tutorial is a pair (``tutorials/NN_name.py`` in percent cells and the notebook
``NN_name.ipynb``) kept in sync by jupytext; every notebook runs top to bottom with nbclient, offline,
on the shipped models, in a scratch working folder it does not write outside of, shows rich output
(heatmaps, graphs, plots) inline, asserts what it teaches and has exercises whose folded solutions run
and assert. The README's failure example is a failure by the library's own rule (Δℓ > 1).

After editing a tutorial (either file): ``jupytext --sync tutorials/*.py``."""

from __future__ import annotations

import ast
import json
import re
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TUTORIALS = sorted((ROOT / "tutorials").glob("[0-9][0-9]_*.py"))
SYNC = "run `jupytext --sync tutorials/*.py` after editing a tutorial"
#: what a notebook must show inline, by tutorial: HTML views of results and matplotlib figures
RICH = {"00": {"text/html"}, "01": {"text/html", "image/png"}, "02": {"text/html"}, "03": {"text/html", "image/png"},
        "04": {"image/png"}, "05": {"text/html", "image/png"}, "06": {"text/html", "image/png"}}

jupytext = pytest.importorskip("jupytext", reason="jupytext (dev extra) is not installed")
nbformat = pytest.importorskip("nbformat", reason="nbformat (dev extra) is not installed")


def _cells(notebook) -> list[tuple]:
    return [(c.cell_type, c.source.strip(), tuple(c.metadata.get("tags", ())),
             bool(c.metadata.get("jupyter", {}).get("source_hidden"))) for c in notebook.cells]


def test_there_are_tutorials():
    assert [p.name[:3] for p in TUTORIALS] == ["00_", "01_", "02_", "03_", "04_", "05_", "06_"]
    assert set(RICH) == {p.name[:2] for p in TUTORIALS}


@pytest.mark.parametrize("script", TUTORIALS, ids=lambda p: p.name)
def test_tutorial_and_notebook_are_in_sync(script):
    paired = script.with_suffix(".ipynb")
    assert paired.exists(), f"{paired.name} is missing: {SYNC}"
    notebook = nbformat.read(paired, as_version=4)
    assert _cells(notebook) == _cells(jupytext.read(script)), f"{script.name} and {paired.name} differ: {SYNC}"
    assert all(not c.get("outputs") for c in notebook.cells), f"{paired.name} is committed with outputs (clear them)"
    assert notebook.metadata.get("kernelspec", {}).get("name") == "python3"


@pytest.mark.parametrize("script", TUTORIALS, ids=lambda p: p.name)
def test_tutorial_has_checked_exercises_and_no_writes_outside_its_folder(script):
    text = script.read_text()
    asserts = [n for n in ast.walk(ast.parse(text)) if isinstance(n, ast.Assert)]
    assert len(asserts) >= 3, "a tutorial asserts its claims instead of only printing them"
    cells = jupytext.read(script).cells
    exercises = [i for i, c in enumerate(cells) if "exercise" in c.metadata.get("tags", ())]
    assert exercises, "every notebook has exercises"
    for i in exercises:
        solution = cells[i + 1]
        assert "solution" in solution.metadata.get("tags", ()) and solution.metadata["jupyter"]["source_hidden"]
        assert "my_prediction" in cells[i].source and "assert " in solution.source and "my_prediction" in solution.source
        assert "predict" in cells[i - 1].source.lower()
    # the working folder only: no temporary directories, absolute paths or home directories
    assert not re.search(r"tempfile|gettempdir|['\"]/tmp|expanduser|Path\.home", text), script.name


def _kernel(tmp_path: Path, monkeypatch) -> str:
    """A kernel spec running this interpreter (not whatever ``python`` a system-wide spec names)."""
    spec = tmp_path / "jupyter" / "kernels" / "cage-lens-tests"
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(json.dumps({"argv": argv, "display_name": "cage-lens tests", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    return "cage-lens-tests"


@pytest.mark.slow
@pytest.mark.parametrize("script", TUTORIALS, ids=lambda p: p.name)
def test_notebook_runs_with_rich_output(script, tmp_path, monkeypatch):
    pytest.importorskip("ipykernel", reason="ipykernel (dev extra) is not installed")
    from nbclient import NotebookClient

    kernel = _kernel(tmp_path, monkeypatch)
    work, scratch = tmp_path / "work", tmp_path / "tmp"
    work.mkdir()
    scratch.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))
    # libraries' own caches (matplotlib's fonts, torch's compiler cache) go elsewhere: TMPDIR is the notebook's
    monkeypatch.setenv("MPLCONFIGDIR", str(tmp_path / "mpl"))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "torch"))
    notebook = nbformat.read(script.with_suffix(".ipynb"), as_version=4)
    start = time.perf_counter()
    NotebookClient(notebook, kernel_name=kernel, timeout=900, resources={"metadata": {"path": str(work)}}).execute()
    print(f"{script.name}: {time.perf_counter() - start:.1f} s")
    shown = {kind for c in notebook.cells for o in c.get("outputs", []) for kind in o.get("data", {})}
    assert RICH[script.name[:2]] <= shown, f"{script.name} shows {sorted(shown)} inline"
    html = [o["data"]["text/html"] for c in notebook.cells for o in c.get("outputs", []) if "text/html" in o.get("data", {})]
    if "text/html" in RICH[script.name[:2]]:
        assert any("cl-bar" in h for h in html), "a cage_lens view (with its colour bar) is shown inline"
    assert list(scratch.iterdir()) == [], "the notebook wrote to the temporary directory"


def test_readme_failure_example_is_a_failure():
    """README's explain_failure example: the early checkpoint prefers the wrong name by more than 1 logit."""
    import cage_lens
    from cage_lens import zoo

    readme = (ROOT / "README.md").read_text()
    checkpoint = int(re.search(r'early = zoo\.load\("ioi", checkpoint=(\d+)\)', readme).group(1))
    prompt, correct = re.search(r'cage_lens\.explain_failure\(early, "([^"]+)", correct="([^"]+)"\)', readme).groups()
    explanation = cage_lens.explain_failure(zoo.load("ioi", checkpoint=checkpoint), prompt, correct=correct)
    assert explanation.delta > 1, explanation.delta
    assert f"Δℓ = {explanation.delta:+.2f}" in readme
