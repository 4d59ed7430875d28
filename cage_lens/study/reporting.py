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
from cage_lens.study.aggregate import Comparison, StudySummary, _frame, _models, compare, summary
from cage_lens.study.extras import MissingExtraError, require
from cage_lens.views.html import html_page, token_spans_html

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


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return f"<img alt='plot' src='data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}'>"


def _table_html(df: pd.DataFrame) -> str:
    return df.to_html(float_format=lambda v: "–" if math.isnan(v) else f"{v:+.3f}", border=0)


def _comparisons(df: pd.DataFrame) -> list[Comparison]:
    models = _models(df)
    anchor = (df.attrs.get("manifest") or {}).get("settings", {}).get("cases_from")
    pairs = [(anchor, m) for m in models if m != anchor] if anchor else list(zip(models[:-1], models[1:]))
    out = []
    for a, b in pairs:
        try:
            out.append(compare(df, a, b))
        except CageLensError:
            continue
    return out


def _examples(df: pd.DataFrame, per_model: int) -> str:
    parts = []
    for m in _models(df):
        ex = df[(df["model"] == m) & (df["status"] == "explained")].sort_values("delta", ascending=False)
        for _, r in ex.head(per_model).iterrows():
            parts.append(
                f"<div style='margin:6px 0'><b>{html.escape(m)}</b> record {r['record']}: wrong "
                f"{html.escape(repr(r['wrong']))} vs {html.escape(repr(r['contrast']))} (Δℓ = {r['delta']:+.3g})<br>"
                f"{token_spans_html(list(r['str_tokens']), list(r['heatmap']), list(r['relevance']))}</div>"
            )
    return "".join(parts)


def report(data, path: str | Path | None = None, *, examples: int = 3, plots: bool = True) -> str:
    """A self-contained HTML page: settings, counts, Δℓ, segment relevance with CIs, paired comparisons,
    top-relevance locations, plots (when matplotlib is installed) and example heatmaps."""
    df = _frame(data)
    s = summary(df)
    manifest = df.attrs.get("manifest", {})
    body = [
        f"<p>{len(df)} cases ({df.attrs.get('missing', 0)} not computed yet). Relevance sign: red/positive "
        "supports the wrong token, blue/negative the correct one.</p>",
        "<h3>Settings</h3><pre>" + html.escape(json.dumps(
            {k: manifest.get(k) for k in ("cage_lens_version", "settings", "models", "checker", "dataset")}, indent=1)) + "</pre>",
        "<h3>Cases</h3>" + s.counts.to_html(border=0, float_format=lambda v: f"{v:.3f}"),
        "<h3>Δℓ</h3>" + _table_html(s.delta),
        "<h3>Segment relevance (mean, 95 % bootstrap CI)</h3>" + _table_html(s.segments),
    ]
    for c in _comparisons(df):
        body.append(f"<h3>{html.escape(c.b)} vs {html.escape(c.a)} ({c.n_pairs} paired cases; diff = b − a, "
                    "sign-flip permutation test, Holm-adjusted)</h3>" + _table_html(c.table))
    body.append("<h3>Where the top relevance sits (share of explained cases)</h3>" + _table_html(s.top))
    if plots:
        try:
            body.append("<h3>Plots</h3>" + _png(plot_segments(s)) + _png(plot_delta(df)))
        except MissingExtraError as err:
            body.append(f"<p><i>{html.escape(str(err))}</i></p>")
    if examples:
        body.append("<h3>Examples (largest Δℓ per model)</h3>" + _examples(df, examples))
    page = html_page("cage_lens failure study", "".join(body))
    if path is not None:
        Path(path).write_text(page, encoding="utf-8")
    return page
