"""Static HTML views: self-contained token heatmaps (notebooks, reports), the layer × token table and
the CLI's report page. No scripts; the interactive pages are :mod:`cage_lens.views.viewer`.

Colours follow :func:`cage_lens.views.terminal.relevance_color` (red positive, blue negative).
"""

from __future__ import annotations

import html
from typing import Sequence

from cage_lens.views.terminal import printable, relevance_color

__all__ = ["token_spans_html", "attribution_html", "html_page", "layer_token_table_html", "explain_report_html"]


def token_spans_html(tokens: Sequence[str], scaled: Sequence[float], raw: Sequence[float] | None = None) -> str:
    raw = scaled if raw is None else raw
    spans = []
    for tok, s, r in zip(tokens, scaled, raw):
        text = html.escape(printable(tok)).replace(" ", "&nbsp;") or "&#8203;"
        spans.append(
            f'<span title="{html.escape(repr(tok))}: {r:+.4g}" '
            f'style="background:{relevance_color(s)};padding:1px 2px;margin:1px;border-radius:3px;'
            f'font-family:monospace;display:inline-block">{text}</span>'
        )
    return "".join(spans)


def attribution_html(attribution, max_rows: int = 8) -> str:
    rows = []
    for row in range(min(attribution.token_relevance.shape[0], max_rows)):
        n = attribution.lengths[row]
        scaled = attribution.normalized(row).tolist()
        raw = attribution.token_relevance[row, :n].tolist()
        rows.append(
            f"<div style='margin:4px 0'>{token_spans_html(attribution.str_tokens[row][:n], scaled, raw)}"
            f"<span style='margin-left:8px;color:#666'>→ {html.escape(attribution.target_description)} = "
            f"{float(attribution.target_value[row]):.4g}</span></div>"
        )
    head = (
        f"<div style='font-family:sans-serif;font-size:13px'><b>cage_lens</b> {html.escape(attribution.rules)} "
        f"relevance (red supports the target, blue opposes it; BOS excluded from the colour scale)</div>"
    )
    return head + "".join(rows)


def html_page(title: str, body: str) -> str:
    """A complete, self-contained HTML document (no scripts or assets fetched from anywhere)."""
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title>"
        "<style>body{font-family:sans-serif;margin:24px;max-width:1100px}"
        "table{border-collapse:collapse}td,th{padding:2px 6px;text-align:right;font-size:12px}</style>"
        f"</head><body><h2>{html.escape(title)}</h2>{body}</body></html>"
    )


def layer_token_table_html(str_tokens: Sequence[str], names: Sequence[str], matrix) -> str:
    """Layer × token heatmap table; each row is scaled by its own max |R| (the title shows raw values)."""
    header = "<tr><th></th>" + "".join(
        f"<th style='writing-mode:vertical-rl;font-family:monospace'>{html.escape(printable(t))}</th>" for t in str_tokens
    ) + "</tr>"
    rows = []
    for name, values in zip(names, matrix.tolist()):
        scale = max(max(abs(v) for v in values), 1e-30)
        cells = "".join(
            f"<td title='{v:+.4g}' style='background:{relevance_color(v / scale)};min-width:14px'></td>" for v in values
        )
        rows.append(f"<tr><th style='text-align:left;font-family:monospace'>{html.escape(name)}</th>{cells}</tr>")
    return f"<table>{header}{''.join(rows)}</table>"


def explain_report_html(attribution, prompt: str, continuation: str, model_name: str) -> str:
    """The CLI's report: heatmap, layer × token trace and the conservation table, in one page."""
    n = attribution.lengths[0]
    names, trace = attribution.layer_trace(0)
    conservation = attribution.conservation
    cons_rows = "".join(
        f"<tr><td style='text-align:left'>{html.escape(p)}</td><td>{float(s):.5g}</td>"
        f"<td>{'' if i == 0 else f'{float(conservation.absorbed[0, i - 1]):.4g}'}</td></tr>"
        for i, (p, s) in enumerate(zip(conservation.points, conservation.sums[0]))
    )
    body = (
        f"<p><b>model</b> {html.escape(model_name)} &nbsp; <b>rules</b> {html.escape(attribution.rules)}<br>"
        f"<b>prompt</b> {html.escape(printable(prompt))}<br>"
        f"<b>greedy continuation</b> {html.escape(printable(continuation))}<br>"
        f"<b>explained</b> {html.escape(attribution.target_description)} = {float(attribution.target_value[0]):.4f}</p>"
        "<h3>Input tokens</h3>" + attribution_html(attribution, max_rows=1)
        + "<h3>Relevance per layer and token</h3>"
        + layer_token_table_html(attribution.str_tokens[0][:n], names, trace[:, :n])
        + "<h3>Conservation</h3><table><tr><th>point</th><th>Σ relevance</th><th>absorbed</th></tr>"
        + cons_rows + "</table>"
    )
    return html_page("cage_lens explanation", body)
