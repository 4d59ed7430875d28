"""The built wheel carries everything the package reads at run time (tokenizer assets, zoo models, the
model card) and the console script. Built from a copy of the checkout, so the tree stays clean."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    if importlib.util.find_spec("build") is None:  # an optional dev tool, installed by `pip install -e .[dev]`
        pytest.skip("the 'build' package is not installed (pip install build)")
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "cage_lens", src / "cage_lens", ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("dist")
    proc = subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(out), str(src)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    (path,) = out.glob("*.whl")
    return zipfile.ZipFile(path)


def test_wheel_holds_the_runtime_files(wheel):
    names = set(wheel.namelist())
    shipped = {p.relative_to(ROOT).as_posix() for p in (ROOT / "cage_lens").rglob("*")
               if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"}
    assert shipped - names == set()  # every file of the package, data included
    assert "cage_lens/assets/tiny_tokenizer/tokenizer.json" in names
    assert "cage_lens/zoo/MODEL_CARD.md" in names
    assert "cage_lens/zoo/models/ioi-small/model.safetensors" in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert not any(n.startswith(("tests/", "benchmarks/", "dir_gpt2/")) for n in names)


def test_wheel_declares_the_console_script(wheel):
    (entry_points,) = [n for n in wheel.namelist() if n.endswith(".dist-info/entry_points.txt")]
    assert "cage-lens = cage_lens.cli:main" in wheel.read(entry_points).decode()
