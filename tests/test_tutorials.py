"""Every tutorial runs top to bottom, offline, on the shipped models, and asserts what it teaches
(agreement with by-hand computations, conservation, AUROC and paired wins): a tutorial whose claim
stops holding fails here."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TUTORIALS = sorted((ROOT / "tutorials").glob("*.py"))


def test_there_are_tutorials():
    assert [p.name[:3] for p in TUTORIALS] == ["01_", "02_", "03_", "04_", "05_"]


@pytest.mark.parametrize("script", TUTORIALS, ids=lambda p: p.name)
def test_tutorial_runs_and_checks_its_claims(script):
    asserts = [n for n in ast.walk(ast.parse(script.read_text())) if isinstance(n, ast.Assert)]
    assert len(asserts) >= 3, "a tutorial asserts its claims instead of only printing them"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip()
