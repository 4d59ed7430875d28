"""Plots (matplotlib, the optional ``plot`` extra) and a self-contained HTML report of a study."""

from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path

import pandas as pd

from cage_lens.errors import CageLensError
from cage_lens.study.aggregate import Comparison, StudySummary, _frame, _models, compare, html_table, summary
from cage_lens.study.extras import MissingExtraError, require
from cage_lens.views.html import colour_bar_html, escaped, html_page, token_spans_html

__all__ = ["plot_segments", "plot_delta", "report"]


def _figure(width: float, height: float):
    figure = require("matplotlib.figure", "plots", "plot")
    return figure.Figure(figsize=(width, height), layout="constrained")


def plot_segments(data, *, segments: list[str] | None = None):
    """Mean normalised segment relevance per model with 95 % bootstrap CIs (a matplotlib Figure)."""
    s = data if isinstance(data, StudySummary) else summary(data)
    table = s.segments.reset_index()
    segs = segments or [x for x in dict.fromkeys(table["segment"])]
    models = list(dict.fromkeys(table["model"]))
    fig = _figure(1.2 + 0.9 * len(segs) * max(1, len(models)) / 3, 3.2)
    ax = fig.subplots()
    width = 0.8 / max(1, len(models))
    for i, m in enumerate(models):
        t = table[table["model"] == m].set_index("segment").reindex(segs)
        x = [j + (i - (len(models) - 1) / 2) * width for j in range(len(segs))]
        err = [(t["mean"] - t["ci_low"]).fillna(0).tolist(), (t["ci_high"] - t["mean"]).fillna(0).tolist()]
        ax.bar(x, t["mean"].fillna(0).tolist(), width, yerr=err, capsize=2, label=m)
    ax.axhline(0, color="k", lw=0.6)
    ax.set_xticks(range(len(segs)), segs, rotation=30, ha="right")
    ax.set_ylabel("Σ relevance / max|R|\n(+ wrong, − correct)")
    ax.legend(fontsize=7)
    return fig


def plot_delta(data):
    """Histogram of Δℓ per model over cases with a contrast (a matplotlib Figure)."""
    df = _frame(data)
    fig = _figure(5, 3)
    ax = fig.subplots()
    for m in _models(df):
        d = df[(df["model"] == m) & df["status"].isin(["explained", "low_delta"])]["delta"].dropna()
        if len(d):
            ax.hist(d, bins=20, histtype="step", label=f"{m} (n={len(d)})")
    ax.set_xlabel("Δℓ = logit(wrong) − logit(contrast)")
    ax.set_ylabel("cases")
    ax.legend(fontsize=7)
    return fig


def _png(fig, alt: str) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return f"<img alt='{html.escape(alt, quote=True)}' src='data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}'>"


def _comparisons(df: pd.DataFrame) -> list[Comparison]:
    models = _models(df)
    anchor = _anchor(df)
    pairs = [(anchor, m) for m in models if m != anchor] if anchor else list(zip(models[:-1], models[1:]))
    out = []
    for a, b in pairs:
        try:
            out.append(compare(df, a, b))
        except CageLensError:
            continue
    return out


def _anchor(df: pd.DataFrame) -> str | None:
    return (df.attrs.get("manifest") or {}).get("settings", {}).get("cases_from")


# ---------------------------------------------------------------------------- summary first
def _interval(mean: float, lo: float, hi: float) -> str:
    return "–" if math.isnan(mean) else f"{mean:+.2f} [{lo:+.2f}, {hi:+.2f}]"


def _p(value: float) -> str:
    return "–" if math.isnan(value) else ("< 0.001" if value < 0.001 else f"{value:.3g}")


def _summary_html(df: pd.DataFrame, s: StudySummary, comparisons: list[Comparison]) -> str:
    """The findings in a few lines: per model what was found and explained, then each comparison."""
    items = []
    anchor = _anchor(df)
    for m in s.counts.index:
        c, d = s.counts.loc[m], s.delta.loc[m]
        usable = "–" if math.isnan(c["usable"]) else f"{c['usable']:.0%}"
        if anchor and m != anchor:
            what = (f"explains the {int(c['explained'])} cases of {escaped(anchor)} (same inputs, same wrong and "
                    f"correct tokens); mean Δℓ on them {_interval(d['mean'], d['ci_low'], d['ci_high'])}")
        else:
            what = (f"{int(c['failures'])} failures in {int(c['records'])} records, {int(c['explained'])} explained "
                    f"(usable rate {usable}; the others had Δℓ ≤ the threshold or no correct token in the top-k); "
                    f"mean Δℓ {_interval(d['mean'], d['ci_low'], d['ci_high'])}")
        items.append(f"<li><b>{escaped(m)}</b>: {what}</li>")
    for comp in comparisons:
        t = comp.table
        changed = [f"{escaped(r)} {t.loc[r, 'diff']:+.2f} (p<sub>Holm</sub> {_p(t.loc[r, 'p_holm'])})"
                   for r in t.index if r != "delta" and t.loc[r, "p_holm"] < 0.05]
        line = (f"<li><b>{escaped(comp.b)} vs {escaped(comp.a)}</b> on {comp.n_pairs} paired cases: Δℓ changes by "
                + (f"{_interval(t.loc['delta', 'diff'], t.loc['delta', 'ci_low'], t.loc['delta', 'ci_high'])} "
                   f"(p<sub>Holm</sub> {_p(t.loc['delta', 'p_holm'])})" if "delta" in t.index else "–")
                + "; segments that change (p<sub>Holm</sub> &lt; 0.05): " + (", ".join(changed) or "none") + "</li>")
        items.append(line)
    return (f"<h3>Summary</h3><ul>{''.join(items)}</ul><p>Δℓ = logit(wrong) − logit(correct): positive means the model "
            "prefers the wrong token. Relevance: red / positive supports the wrong token, blue / negative the correct one. "
            "Intervals are 95 % bootstrap CIs; p-values come from paired sign-flip permutation tests, Holm-adjusted.</p>")


def _overlaps(df: pd.DataFrame) -> dict[str, list[str]]:
    """``{segment: [segments inside it]}`` over the stored cases (a token can belong to several segments)."""
    inside: dict[str, set] = {}
    for segments in df.loc[df["status"] == "explained", "segments"].dropna():
        spans = {k: set(int(p) for p in v) for k, v in dict(segments).items() if not k.startswith("_") and len(v)}
        for a, pa_ in spans.items():
            for b, pb in spans.items():
                if a != b and pb <= pa_ and (len(pb) < len(pa_) or a < b):
                    inside.setdefault(a, set()).add(b)
    return {a: sorted(b) for a, b in sorted(inside.items())}


def _overlap_legend(df: pd.DataFrame) -> str:
    overlaps = _overlaps(df)
    if not overlaps:
        return "<p>The segments do not overlap: each token belongs to at most one.</p>"
    listed = "; ".join(f"{escaped(a)} contains {', '.join(escaped(b) for b in bs)}" for a, bs in overlaps.items())
    return (f"<p><b>Overlapping segments</b>: {listed}. A token counts for every segment that contains it, so the "
            "shares in one row can add up to more than 1 and the relevance of overlapping segments is not additive.</p>")


# ---------------------------------------------------------------------------- examples
def _example_label(row, anchor: str | None) -> str:
    """What a stored case shows, in words that match what the model did."""
    wrong, correct, delta = escaped(repr(row["wrong"])), escaped(repr(row["contrast"])), row["delta"]
    if row["contrast_source"] == "anchor":
        verdict = (f"this model still prefers the wrong token (Δℓ = {delta:+.3g})" if delta > 0 else
                   f"this model answers correctly here (Δℓ = {delta:+.3g})")
        return f"{escaped(anchor)}'s wrong token {wrong} against the correct {correct}: {verdict}"
    return f"answered {wrong} where {correct} was correct (Δℓ = {delta:+.3g})"


def _examples(df: pd.DataFrame, per_model: int) -> str:
    """The cases with the largest Δℓ; in a paired study the anchor's cases, each shown for every model."""
    anchor = _anchor(df)
    explained = df[df["status"] == "explained"]
    parts = []
    bar = colour_bar_html("per row, ±1 = max |R| over non-special tokens",
                          negative="supports the correct token", positive="supports the wrong token")
    groups = ([(anchor, explained[explained["model"] == anchor].sort_values("delta", ascending=False)
                .head(per_model)["record"].tolist())] if anchor else
              [(m, explained[explained["model"] == m].sort_values("delta", ascending=False).head(per_model)["record"].tolist())
               for m in _models(df)])
    for owner, records in groups:
        for record in records:
            rows = explained[explained["record"] == record] if anchor else explained[
                (explained["record"] == record) & (explained["model"] == owner)]
            lines = "".join(
                f"<div style='margin:2px 0'><b>{escaped(r['model'])}</b>: {_example_label(r, anchor)}<br>"
                f"{token_spans_html(list(r['str_tokens']), list(r['heatmap']), list(r['relevance']))}</div>"
                for _, r in rows.iterrows()
            )
            parts.append(f"<div style='margin:10px 0'>record {int(record)}{lines}</div>")
    return bar + "".join(parts)


# ---------------------------------------------------------------------------- the page
def report(data, path: str | Path | None = None, *, examples: int = 3, plots: bool = True) -> str:
    """A self-contained HTML page: the findings first (per model and per comparison), then the tables
    (cases, Δℓ, segment relevance with CIs, paired comparisons, where the top relevance sits), plots
    (when matplotlib is installed), example heatmaps, and the settings folded at the end."""
    df = _frame(data)
    s = summary(df)
    comparisons = _comparisons(df)
    manifest = df.attrs.get("manifest", {})
    body = [
        f"<p>{len(df)} cases ({df.attrs.get('missing', 0)} not computed yet).</p>",
        _summary_html(df, s, comparisons),
        "<h3>Cases per model</h3><p>failures: deviations found on the model's own generations; usable = explained ÷ "
        "failures (– where a model has no failures of its own, e.g. one that explains another model's cases).</p>"
        + html_table(s.counts),
        "<h3>Δℓ = logit(wrong) − logit(correct)</h3><p>Cases with a contrast token (explained and dropped).</p>"
        + html_table(s.delta),
        "<h3>Segment relevance (mean, 95 % bootstrap CI)</h3><p>Σ relevance over the segment's tokens ÷ max |R| "
        "over non-special tokens; positive supports the wrong token.</p>" + html_table(s.segments),
    ]
    for c in comparisons:
        body.append(f"<h3>{escaped(c.b)} vs {escaped(c.a)} ({c.n_pairs} paired cases)</h3><p>diff = {escaped(c.b)} − "
                    f"{escaped(c.a)}; p: paired sign-flip permutation test, p_holm: Holm-adjusted across rows.</p>"
                    + html_table(c.table))
    body.append("<h3>Where the top relevance sits (share of explained cases)</h3><p>top_wrong: the token pushing "
                "hardest towards the wrong answer lies in the segment; top_correct: likewise towards the correct one.</p>"
                + _overlap_legend(df) + html_table(s.top))
    if plots:
        try:
            body.append("<h3>Plots</h3>" + _png(plot_segments(s), "segment relevance per model with 95 % CIs")
                        + _png(plot_delta(df), "histogram of Δℓ per model"))
        except MissingExtraError as err:
            body.append(f"<p><i>{escaped(err)}</i></p>")
    if examples:
        body.append("<h3>Examples (largest Δℓ" + (" of the anchor model, every model on the same case" if _anchor(df) else
                                                 " per model") + ")</h3>" + _examples(df, examples))
    settings = {k: manifest.get(k) for k in ("cage_lens_version", "settings", "models", "checker", "dataset")}
    body.append("<details><summary>Settings and provenance</summary><pre>"
                + html.escape(printable_json(settings)) + "</pre></details>")
    page = html_page("cage_lens failure study", "".join(body))
    if path is not None:
        Path(path).write_text(page, encoding="utf-8")
    return page


def printable_json(value) -> str:
    """JSON for the page: indented, every non-ASCII character (bidi overrides, line separators) escaped."""
    return json.dumps(value, indent=1, ensure_ascii=True, default=str)
