"""Views outside the browser: every view (terminal, notebook outputs, static and interactive pages, the
study report, plots) shows control and bidi characters as visible escapes; the terminal heatmap separates
tokens in a real pseudo-terminal; every CLI argument is described; the CAGE page of the CLI carries the
explanation of the Python page; every result has a notebook view; the study report reads (summary first,
settings folded, labels that match what the model did, unsigned p-values, "–" for undefined rates, a
legend for overlapping segments)."""

from __future__ import annotations

import argparse
import os
import re
import select
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import cage_lens
from cage_lens import study, zoo
from cage_lens.generation.graph import GenerationGraph
from cage_lens.views.html import explain_report_html
from cage_lens.views.terminal import terminal_heatmap
from conftest import cached_model

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "the cat sat on the mat and john"
IOI_PROMPT = "when mary and john went to the store , john gave a drink to"
RLO, ESC = "\u202e", "\x1b"
HOSTILE = [RLO + "olleh", ESC + "[31mred", "a\u2066b", "c\x00d"]
#: the colour codes terminal_heatmap writes itself: a 24-bit background, black or white text, reset
OWN_CODES = re.compile(r"\x1b\[48;2;\d+;\d+;\d+m|\x1b\[(30|97|0)m")


def assert_escaped(text: str, where: str) -> None:
    plain = OWN_CODES.sub("", text)
    for raw in (RLO, ESC, "\u2066", "\x00"):
        assert raw not in plain, f"{where}: raw {raw!r} reaches the view"
    assert "\\u202e" in plain or "\\\\u202e" in plain, f"{where}: the hostile token is not shown at all"


# ---------------------------------------------------------------------------- escaping everywhere
@pytest.fixture(scope="module")
def paired_study(tmp_path_factory):
    """A small paired study: the IOI step-100 checkpoint's failures, re-explained by the final model."""
    data = zoo.dataset("ioi", 16, seed=0)
    out = tmp_path_factory.mktemp("study") / "store"
    study.run({"early": "ioi@100", "final": "ioi"}, data.records, out, checker=data.checker, cases_from="early",
              progress=False)
    return study.load(out)


def test_every_view_escapes_control_and_bidi_characters(paired_study):
    model = cached_model("gpt2")
    attr = cage_lens.attribute(model, PROMPT, target=" mat")
    attr.str_tokens[0][1:5] = HOSTILE
    names, trace = attr.layer_trace(0)
    views = {
        "Attribution._repr_html_": attr._repr_html_(),
        "Attribution.to_html": attr.to_html(),
        "Attribution.show (ANSI colours)": attr.show(),
        "terminal heatmap without colour": terminal_heatmap(attr.str_tokens[0], attr.normalized(0).tolist(), color=False),
        "CLI report page": explain_report_html(attr, RLO + PROMPT, ESC + "[2J mat", RLO + "model"),
    }
    graph = cage_lens.circuit_graph(model, PROMPT, " mary", levels="half")
    graph.str_tokens[1:5] = HOSTILE
    views |= {"CircuitGraph._repr_html_": graph._repr_html_(), "CircuitGraph.to_html": graph.to_html()}
    failure = cage_lens.explain_failure(model, PROMPT, wrong=" dog", correct=" cat")
    failure.prompt_tokens[1:5] = HOSTILE
    failure.graph.str_tokens[1:5] = HOSTILE
    failure.wrong = RLO + "dog"
    views |= {"FailureExplanation._repr_html_": failure._repr_html_(), "FailureExplanation.to_html": failure.to_html()}
    gen = GenerationGraph.from_table(torch.ones(4, 6), 2, labels=["p", *HOSTILE, RLO + "end"])
    views |= {"GenerationGraph._repr_html_": gen._repr_html_(), "GenerationGraph.to_html": gen.to_html()}
    df = paired_study.copy()
    row = df.index[df["status"] == "explained"][0]
    df.at[row, "str_tokens"] = HOSTILE + list(df.at[row, "str_tokens"])[len(HOSTILE):]
    df.at[row, "wrong"] = RLO + "bob"
    df.at[row, "contrast"] = ESC + "[1mann"
    df.attrs = dict(paired_study.attrs)
    df.attrs["manifest"] = dict(df.attrs["manifest"], dataset=RLO + "dataset")
    views["study report"] = study.report(df, examples=16, plots=False)
    for where, text in views.items():
        assert_escaped(text, where)


def test_plot_labels_are_escaped():
    pytest.importorskip("matplotlib", reason="matplotlib (the 'plot' extra) is not installed")
    attr = cage_lens.attribute(cached_model("gpt2"), PROMPT, target=" mat")
    attr.str_tokens[0][1:5] = HOSTILE
    labels = " ".join(t.get_text() for ax in attr.plot().axes for t in ax.get_xticklabels())
    assert_escaped(labels, "Attribution.plot tick labels")


# ---------------------------------------------------------------------------- the terminal
def _run_in_a_terminal(args: list[str], timeout: float = 240) -> str:
    """Run ``python -m cage_lens.cli ARGS`` with a pseudo-terminal as stdin/stdout/stderr; its output."""
    master, slave = os.openpty()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), TERM="xterm-256color",
               COLUMNS="200")
    env.pop("NO_COLOR", None)
    proc = subprocess.Popen([sys.executable, "-m", "cage_lens.cli", *args], stdin=slave, stdout=slave, stderr=slave,
                            env=env, cwd=ROOT, close_fds=True)
    os.close(slave)
    chunks = []
    try:
        while True:
            ready, _, _ = select.select([master], [], [], timeout)
            if not ready:
                raise AssertionError("the command printed nothing for too long")
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the terminal's other end closed (Linux)
                break
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(master)
        proc.wait(timeout=60)
    assert proc.returncode == 0, b"".join(chunks).decode(errors="replace")[-2000:]
    return b"".join(chunks).decode()


def test_the_heatmap_separates_tokens_in_a_real_terminal():
    out = _run_in_a_terminal(["explain", IOI_PROMPT, "--contrast", " john"])
    assert "\x1b[48;2;" in out  # a terminal: the coloured heatmap, not the piped text form
    plain = OWN_CODES.sub("", out)
    assert "<bos> when mary and john went to the store , john gave a drink to" in plain
    assert "<bos>when" not in plain and "whenmary" not in plain


def test_coloured_heatmap_text_reads_on_every_cell():
    from cage_lens.views.terminal import contrast_ratio, relevance_color

    out = terminal_heatmap(["a", "b", "c", "d"], [-1.0, -0.4, 0.4, 1.0])
    cells = re.findall(r"\x1b\[48;2;(\d+);(\d+);(\d+)m\x1b\[(30|97)m(\w)\x1b\[0m", out)
    assert [c[-1] for c in cells] == ["a", "b", "c", "d"] and out.count(" ") == 3
    for (r, g, b, fg, _), value in zip(cells, [-1.0, -0.4, 0.4, 1.0]):
        assert f"rgb({r},{g},{b})" == relevance_color(value)
        assert contrast_ratio("#000000" if fg == "30" else "#ffffff", f"rgb({r},{g},{b})") >= 4.5


# ---------------------------------------------------------------------------- CLI
def _actions(parser: argparse.ArgumentParser, path: str = "cage-lens"):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _actions(sub, f"{path} {name}")
        elif not isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
            yield path, action


def test_cli_help_describes_every_argument():
    from cage_lens.cli import build_parser

    undescribed = [f"{path} {a.dest}" for path, a in _actions(build_parser()) if not (a.help or "").strip()]
    assert undescribed == []
    assert len(list(_actions(build_parser()))) > 40


def test_cli_cage_page_explains_like_the_python_page(tmp_path, capsys):
    from cage_lens.cli import main

    prompt, completion = "c > i ; f > m ; i > n ; start c :", " i n"
    out = tmp_path / "cage.html"
    assert main(["cage", prompt, "--model", "pointer-chase", "--completion", completion, "--out", str(out)]) == 0
    page = out.read_text()
    python_page = cage_lens.cage(zoo.load("pointer-chase"), prompt, completion=completion).to_html()
    explanation = re.search(r"<p>Prompt nodes are coloured.*?</p>", python_page).group(0)
    assert explanation in page
    assert page.count("class='cl-bar'") == python_page.count("class='cl-bar'") == 3


# ---------------------------------------------------------------------------- notebook views
def test_every_result_has_a_notebook_view(paired_study):
    from cage_lens import patching

    model = cached_model("gpt2")
    failure = cage_lens.explain_failure(model, PROMPT, wrong=" dog", correct=" cat")
    html = failure._repr_html_()
    assert f"Δℓ = logit(&#x27;dog&#x27;) − logit(&#x27;cat&#x27;) = {failure.delta:+.4g}" in html
    assert html.count("data-pos=") == 2 * len(failure.prompt_tokens)  # the heatmap and the graph's input strip
    assert "svg class='cl-graph'" in html and "Relevance per layer and token" in html
    clean, corrupted = model.to_tokens(PROMPT), model.to_tokens("the dog sat on the mat and john")

    def metric(logits):
        return logits[0, -1, 5] - logits[0, -1, 6]

    ag = patching.agreement(model, corrupted_tokens=corrupted, clean_tokens=clean, metric=metric, grids=("resid_pre",),
                            rules=("cplrp",))
    assert f"<td>{ag.pearson('cplrp', 'resid_pre'):.3f}</td>" in ag._repr_html_()
    s = study.summary(paired_study)
    c = study.compare(paired_study, "early", "final")
    assert "<td>–</td>" in s._repr_html_()  # the final model's usable rate: it has no failures of its own
    assert f"<td>{c.table.loc['delta', 'diff']:+.3f}</td>" in c._repr_html_()
    for result in (cage_lens.attribute(model, PROMPT), cage_lens.circuit_graph(model, PROMPT, " mary"),
                   cage_lens.cage(model, PROMPT, completion=" mary went"), failure, ag, s, c):
        assert "<" in result._repr_html_()


# ---------------------------------------------------------------------------- the study report
def test_study_report_reads(paired_study):
    from cage_lens.study.aggregate import formatted, html_table

    page = study.report(paired_study, examples=16, plots=False)
    # the findings first, the settings folded at the end
    assert page.index("<h3>Summary</h3>") < page.index("<h3>Cases per model</h3>") < page.index("<details>")
    assert page.index("cage_lens_version") > page.index("<details><summary>Settings and provenance</summary>")
    # labels say what the model did: the final model answers these cases correctly
    final = paired_study[(paired_study["model"] == "final") & (paired_study["status"] == "explained")]
    assert len(final) >= 3 and (final["delta"] < 0).all()
    for delta in final["delta"]:
        assert f"this model answers correctly here (Δℓ = {delta:+.3g})" in page
    for delta in re.findall(r"answered '[^']*' where '[^']*' was correct \(Δℓ = ([^)]*)\)", page):
        assert float(delta) > 1
    # numbers: p-values unsigned, undefined rates "–", never NaN
    s, c = study.summary(paired_study), study.compare(paired_study, "early", "final")
    assert html_table(s.counts) in page and html_table(c.table) in page
    header, rows, _ = formatted(c.table)
    for column in ("p", "p_holm"):
        cells = [r[header.index(column)] for r in rows]
        assert cells and all(not x.startswith(("+", "-")) for x in cells), cells
    header, rows, _ = formatted(s.counts)
    assert [r[header.index("usable")] for r in rows if r[0] == "final"] == ["–"]
    assert not re.search(r">\s*[+-]?nan\s*<", page, re.IGNORECASE)
    # overlapping segments are explained
    assert "<b>Overlapping segments</b>: context contains io, s1; query contains s2." in page
