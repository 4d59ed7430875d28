"""The ``cage-lens`` command runs end to end on the embedded default model."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from cage_lens.cli import main

IOI_PROMPT = "when mary and john went to the store , john gave a drink to"


def test_explain_on_default_zoo_model(tmp_path, capsys):
    out = tmp_path / "report.html"
    assert main(["explain", IOI_PROMPT, "--contrast", " john", "--out", str(out), "--no-color"]) == 0
    printed = capsys.readouterr().out
    assert "continuation:" in printed and "logit('mary') − logit('john')" in printed
    # the IO name is the most relevant token for logit(mary) − logit(john) on the trained IOI model
    top_line = printed.split("most relevant tokens")[1].splitlines()[1]
    assert "'mary'" in top_line and "+" in top_line
    html = out.read_text()
    assert html.startswith("<!DOCTYPE html>") and "<span" in html and "Conservation" in html
    assert "http" not in html  # self-contained


def test_bad_input_is_a_clean_error(capsys):
    assert main(["explain", IOI_PROMPT, "--target", " mary john"]) == 2
    assert "not a single token" in capsys.readouterr().err
    assert main(["explain", IOI_PROMPT, "--model", "./no-such-dir"]) == 2
    assert "is not a directory (and not a zoo model" in capsys.readouterr().err


def test_zoo_listing(capsys):
    assert main(["zoo"]) == 0
    assert "ioi:" in capsys.readouterr().out


@pytest.mark.skipif(shutil.which("cage-lens") is None, reason="console script not installed")
def test_console_script():
    proc = subprocess.run(["cage-lens", "explain", IOI_PROMPT, "--no-color"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "most relevant tokens" in proc.stdout


def test_failure_subcommand(tmp_path, capsys):
    out = tmp_path / "failure.html"
    prompt = "friends lucy and grace found a drink at the station . grace gave it to"
    assert main(["failure", prompt, "--correct", " lucy", "--wrong", " grace", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "FailureExplanation: wrong 'grace' vs correct 'lucy'" in printed
    assert "<svg" in out.read_text()


def test_cage_subcommand(tmp_path, capsys):
    out = tmp_path / "cage.html"
    prompt = "d > i ; o > p ; j > d ; p > j ; a > g ; c > i ; start p :"
    assert main(["cage", prompt, "--model", "pointer-chase", "--completion", " j d i", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "GenerationGraph(method='attnlrp'" in printed and "generated: j | d | i" in printed
    assert out.read_text().startswith("<!DOCTYPE html>")
