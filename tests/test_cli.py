"""The ``cage-lens`` command: end to end on the embedded zoo models; exit 0 on success, 2 with one line
on stderr for every user error (checked before any computation where possible), 130 on Ctrl-C; no
network; ``--help`` without torch."""

from __future__ import annotations

import functools
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from cage_lens import specs
from cage_lens.cli import main

ROOT = Path(__file__).resolve().parents[1]
IOI_PROMPT = "when mary and john went to the store , john gave a drink to"
CHASE_PROMPT = "d > i ; o > p ; j > d ; p > j ; a > g ; c > i ; start p :"
_real_load_model = specs.model_from_spec


@functools.lru_cache(maxsize=None)
def _cached_load(spec):
    return _real_load_model(spec)


@pytest.fixture(autouse=True)
def fast_loads(monkeypatch):
    """Zoo models load once per session (loading is what ``test_model_errors`` checks)."""
    def load(spec):
        return _cached_load(spec) if spec in (None, "pointer-chase") else _real_load_model(spec)

    monkeypatch.setattr(specs, "model_from_spec", load)


def run(argv, capsys) -> tuple[int, str, str]:
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse usage errors and --help
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_user_error(argv, phrase, capsys) -> str:
    code, _, err = run(argv, capsys)
    assert code == 2, err
    assert err.endswith("\n") and err.count("\n") == 1, err  # exactly one line
    assert phrase in err, err
    return err


# ---------------------------------------------------------------------------- success
def test_explain_on_default_zoo_model(tmp_path, capsys):
    out = tmp_path / "report.html"
    code, printed, _ = run(["explain", IOI_PROMPT, "--contrast", " john", "--out", str(out), "--no-color"], capsys)
    assert code == 0
    assert "continuation:" in printed and "logit('mary') − logit('john')" in printed
    # the IO name is the most relevant token for logit(mary) − logit(john) on the trained IOI model
    top_line = printed.split("most relevant tokens")[1].splitlines()[1]
    assert "'mary'" in top_line and "+" in top_line
    html = out.read_text()
    assert html.startswith("<!DOCTYPE html>") and "<span" in html and "Conservation" in html
    assert "http" not in html  # self-contained


def test_failure_subcommand(tmp_path, capsys):
    out = tmp_path / "failure.html"
    prompt = "friends lucy and grace found a drink at the station . grace gave it to"
    code, printed, _ = run(["failure", prompt, "--correct", " lucy", "--wrong", " grace", "--out", str(out)], capsys)
    assert code == 0
    assert "FailureExplanation: wrong 'grace' vs correct 'lucy'" in printed
    assert "<svg" in out.read_text()


def test_cage_subcommand(tmp_path, capsys):
    out = tmp_path / "cage.html"
    argv = ["cage", CHASE_PROMPT, "--model", "pointer-chase", "--completion", " j d i", "--out", str(out)]
    code, printed, _ = run(argv, capsys)
    assert code == 0
    assert "GenerationGraph(method='attnlrp'" in printed and "generated: j | d | i" in printed
    assert out.read_text().startswith("<!DOCTYPE html>")


def test_unknown_words_only_with_allow_unknown(capsys):
    prompt = "when zorblax and john went to the store , john gave a drink to"
    assert_user_error(["explain", prompt], "the prompt has 1 word(s) the model's vocabulary does not contain: 'zorblax'", capsys)
    code, printed, err = run(["explain", prompt, "--allow-unknown", "--no-color"], capsys)
    assert code == 0 and "<unk>" in printed
    assert err == "note: the prompt has 1 word(s) outside the vocabulary, explained as '<unk>': 'zorblax'\n"


def test_zoo_listing(capsys):
    code, printed, _ = run(["zoo"], capsys)
    assert code == 0 and "ioi:" in printed


# ---------------------------------------------------------------------------- user errors: exit 2, one line
@pytest.mark.parametrize("argv, phrase", [
    (["explain", IOI_PROMPT, "--target", " mary john"], "not a single token"),
    (["explain", ""], "the prompt is empty"),
    (["explain", " ".join([IOI_PROMPT] * 5)], "the prompt is 71 tokens long but the model's context (n_ctx) is 64"),
    (["explain", IOI_PROMPT, "--target", " zorblax"], "target ' zorblax' is not in the model's vocabulary"),
    (["explain", IOI_PROMPT, "--target", " mary", "--contrast", " mary"], "target and contrast are the same token"),
    (["failure", IOI_PROMPT, "--correct", " zorblax"], "correct ' zorblax' is not in the model's vocabulary"),
    (["failure", IOI_PROMPT, "--correct", " mary"], "there is no failure to explain"),
    (["explain", IOI_PROMPT, "--top", "-2"], "argument --top: must be at least 1, got -2"),
    (["explain", IOI_PROMPT, "--max-new-tokens", "-5"], "argument --max-new-tokens: must be at least 0, got -5"),
    (["explain", IOI_PROMPT, "--top", "two"], "argument --top: expected an integer, got 'two'"),
    (["explain", IOI_PROMPT, "--rules", "lrp"], "argument --rules: invalid choice"),
    (["cage", CHASE_PROMPT, "--max-new-tokens", "0"], "argument --max-new-tokens: must be at least 1, got 0"),
    (["cage", CHASE_PROMPT, "--model", "pointer-chase", "--completion", ""], "the completion is empty"),
    (["cage", CHASE_PROMPT, "--model", "pointer-chase", "--method", "lime"], "unknown attribution method 'lime'"),
    (["explain"], "the following arguments are required: prompt"),
])
def test_user_errors_exit_2_with_one_line(argv, phrase, capsys):
    assert_user_error(argv, phrase, capsys)


@pytest.mark.parametrize("model, phrase", [
    ("ioi@abc", "'ioi@abc': the checkpoint after '@' must be a training step number"),
    ("ioi@12345", "has no checkpoint 12345"),
    ("ioi:huge", "zoo model 'ioi' has no size 'huge'; available sizes:"),
    ("./no-such-dir", "is not a directory (and not a zoo model"),
    ("ioii", "'ioii' is not a zoo model (pointer-chase, facts, arith, ioi), a local model directory, or a model in "
             "the local Hugging Face cache"),
])
def test_model_errors(model, phrase, capsys, monkeypatch):
    connections = []

    def no_network(self, address):
        connections.append(address)
        raise OSError("network access in a test")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    assert_user_error(["explain", IOI_PROMPT, "--model", model], phrase, capsys)
    assert connections == []  # refused from the cache alone: no hub retries


def test_config_that_does_not_match_the_weights(tmp_path, capsys):
    bad = tmp_path / "bad-model"
    shutil.copytree(ROOT / "cage_lens" / "zoo" / "models" / "ioi-tiny", bad)
    config = json.loads((bad / "config.json").read_text())
    config["intermediate_size"] = config["intermediate_size"] + 8  # the MLP weights no longer fit
    (bad / "config.json").write_text(json.dumps(config))
    err = assert_user_error(["explain", IOI_PROMPT, "--model", str(bad)], "", capsys)
    assert any(word in err.lower() for word in ("mismatch", "shape", "size", "do not fit")), err


def test_models_in_the_local_hub_cache_are_found_without_network(tmp_path, monkeypatch):
    from huggingface_hub import constants

    snapshot = tmp_path / "models--someone--tiny-lm" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (tmp_path / "models--someone--tiny-lm" / "refs").mkdir()
    (tmp_path / "models--someone--tiny-lm" / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    from cage_lens.specs import cached_hub_name

    assert cached_hub_name("someone/tiny-lm") == "someone/tiny-lm"
    assert cached_hub_name("someone/other-lm") is None


def test_out_is_checked_before_the_model_is_loaded(tmp_path, capsys, monkeypatch):
    def must_not_load(spec):
        raise AssertionError("the model was loaded before --out was checked")

    monkeypatch.setattr(specs, "model_from_spec", must_not_load)
    (tmp_path / "file.txt").write_text("")
    for command in (["explain", IOI_PROMPT], ["failure", IOI_PROMPT, "--correct", " mary"], ["cage", CHASE_PROMPT]):
        assert_user_error(command + ["--out", str(tmp_path / "missing" / "r.html")], "does not exist", capsys)
        assert_user_error(command + ["--out", str(tmp_path / "file.txt" / "r.html")], "does not exist", capsys)
        assert_user_error(command + ["--out", str(tmp_path)], "is a directory; give a file name", capsys)


def test_ctrl_c_exits_130_with_one_line(capsys, monkeypatch):
    def interrupted(spec):
        raise KeyboardInterrupt

    monkeypatch.setattr(specs, "model_from_spec", interrupted)
    code, _, err = run(["explain", IOI_PROMPT], capsys)
    assert code == 130 and err == "cage-lens: interrupted\n"


# ---------------------------------------------------------------------------- the real command, in a fresh process
def _python(*args: str, check_rc: int | None = 0) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    if check_rc is not None:
        assert proc.returncode == check_rc, proc.stderr[-3000:]
    return proc


def test_help_imports_neither_torch_nor_transformer_lens():
    code = ("import sys, cage_lens.cli as c\ntry:\n    c.main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print('loaded:', sorted(m for m in ('torch', 'transformer_lens', 'transformers') if m in sys.modules))")
    assert _python("-c", code).stdout.strip().endswith("loaded: []")
    assert "usage: cage-lens" in _python("-m", "cage_lens.cli", "--help").stdout


def test_module_entry_point_end_to_end():
    """What the ``cage-lens`` console script runs (the wheel declares ``cage_lens.cli:main``; see
    tests/test_packaging.py and the wheel step of .ci/run)."""
    proc = _python("-m", "cage_lens.cli", "explain", IOI_PROMPT, "--no-color")
    assert "most relevant tokens" in proc.stdout
    proc = _python("-m", "cage_lens.cli", "explain", IOI_PROMPT, "--top", "0", check_rc=2)
    assert proc.stderr == "cage-lens explain: error: argument --top: must be at least 1, got 0 (see cage-lens explain --help)\n"
