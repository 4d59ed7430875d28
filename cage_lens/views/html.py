"""Static HTML views: self-contained token heatmaps (notebooks, reports), colour bars, the layer × token
table and the CLI's report page. No scripts; the interactive pages are :mod:`cage_lens.views.viewer`.

Colours follow :func:`cage_lens.views.terminal.relevance_color` (red positive, blue negative); text on a
coloured cell is black or white, whichever contrasts more (:func:`cage_lens.views.terminal.text_color`,
at least 4.5:1). Every heatmap comes with a colour bar that states its scale.
"""

from __future__ import annotations

import html
from typing import Sequence

from cage_lens.views.terminal import printable, relevance_color, text_color

__all__ = ["token_spans_html", "colour_bar_html", "attribution_html", "html_page", "layer_token_table_html",
           "explain_report_html", "after_bos_max", "table_html", "escaped", "PAGE_STYLE"]

#: the page style: readable width, tables, the colour bar, folded sections
PAGE_STYLE = (
    "body{font-family:sans-serif;margin:16px 24px;color:#222;line-height:1.35}"
    "h2{margin:4px 0 8px}h3{margin:18px 0 6px}p{max-width:1100px}"
    "table{border-collapse:collapse}td,th{padding:2px 6px;text-align:right;font-size:12px}"
    "th{background:#f3f3f3}tr:nth-child(even) td{background-color:#fafafa}"
    ".cl-bar{display:inline-flex;align-items:center;gap:6px;font-size:12px;color:#333;margin:4px 0}"
    ".cl-bar .cl-ramp{display:inline-block;width:180px;height:12px;border:1px solid #999;"
    "background:linear-gradient(to right,rgb(0,0,255),rgb(255,255,255),rgb(255,0,0))}"
    "details{margin:8px 0}summary{cursor:pointer;color:#333}dl.cl-defs dt{font-weight:bold;margin-top:4px}"
    "dl.cl-defs dd{margin-left:16px;max-width:1000px}"
)


def colour_bar_html(scale: str, negative: str = "opposes the target", positive: str = "supports the target") -> str:
    """A colour bar for a red–white–blue heatmap: the ramp, what each end means, and ``scale`` (what
    the ends stand for in numbers, e.g. ``"±1 = max |R| over non-BOS tokens (2.31)"``)."""
    return (f"<div class='cl-bar'><span>−&nbsp;{html.escape(negative)}</span><span class='cl-ramp'></span>"
            f"<span>+&nbsp;{html.escape(positive)}</span><span>· {html.escape(scale)}</span></div>")


def token_spans_html(tokens: Sequence[str], scaled: Sequence[float], raw: Sequence[float] | None = None,
                     bold: set[int] = frozenset()) -> str:
    """Tokens coloured by relevance already scaled to [-1, 1] (tooltip: position, token and raw value)."""
    raw = scaled if raw is None else raw
    spans = []
    for i, (tok, s, r) in enumerate(zip(tokens, scaled, raw)):
        text = html.escape(printable(tok)).replace(" ", "&nbsp;") or "&#8203;"
        background = relevance_color(s)
        weight = ";font-weight:bold" if i in bold else ""
        spans.append(
            f"<span data-pos='{i}' title='{i} {html.escape(repr(printable(tok)), quote=True)}: {r:+.4g}' "
            f"style='background:{background};color:{text_color(background)};padding:1px 3px;margin:1px;"
            f"border-radius:3px;font-family:monospace;display:inline-block{weight}'>{text}</span>"
        )
    return "".join(spans)


def after_bos_max(values: Sequence[float]) -> float:
    """The largest |R| over the tokens after BOS (what :meth:`Attribution.normalized` divides by)."""
    rest = values[1:] if len(values) > 1 else values
    return max((abs(float(v)) for v in rest), default=0.0)


def attribution_html(attribution, max_rows: int = 8) -> str:
    """The notebook view of an :class:`~cage_lens.Attribution`: one coloured token row per prompt."""
    rows = []
    for row in range(min(attribution.token_relevance.shape[0], max_rows)):
        n = attribution.lengths[row]
        scaled = attribution.normalized(row).tolist()
        raw = attribution.token_relevance[row, :n].tolist()
        rows.append(
            f"<div style='margin:4px 0'>{token_spans_html(attribution.str_tokens[row][:n], scaled, raw)}"
            f"<span style='margin-left:8px;color:#555'>→ {html.escape(printable(attribution.target_description))} = "
            f"{float(attribution.target_value[row]):.4g}; scale ±{after_bos_max(raw):.3g}</span></div>"
        )
    n_rows = attribution.token_relevance.shape[0]
    more = f"<div style='color:#555'>showing {max_rows} of {n_rows} rows</div>" if n_rows > max_rows else ""
    head = (
        f"<div style='font-family:sans-serif;font-size:13px'><b>cage_lens</b> {html.escape(printable(attribution.rules))} "
        "relevance of each input token</div>"
        + colour_bar_html("±1 = the row's max |R| over tokens after BOS (BOS is an attention sink, left out)")
    )
    return f"<div style='font-family:sans-serif'>{head}{''.join(rows)}{more}</div>"


def escaped(text) -> str:
    """Any text for a page: control and bidi characters as visible escapes, then markup escaped."""
    return html.escape(printable(str(text)), quote=True)


def table_html(header: Sequence[str], rows: Sequence[Sequence[str]], index_columns: int = 1) -> str:
    """A plain table of already formatted cells (escaped here; the first ``index_columns`` are row labels)."""
    def cell(i: int, text: str) -> str:
        tag = "th style='text-align:left'" if i < index_columns else "td"
        return f"<{tag}>{escaped(text)}</{tag.split()[0]}>"

    head = "".join(f"<th>{escaped(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(cell(i, c) for i, c in enumerate(row)) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def html_page(title: str, body: str) -> str:
    """A complete, self-contained HTML document (no scripts or assets fetched from anywhere)."""
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>{html.escape(title)}</title><style>{PAGE_STYLE}</style>"
        f"</head><body><h2>{html.escape(title)}</h2>{body}</body></html>"
    )


def layer_token_table_html(str_tokens: Sequence[str], names: Sequence[str], matrix, what: str = "row") -> str:
    """Layer × token heatmap table; each row is scaled by its own max |R| (hover a cell for its raw
    value), with a colour bar saying so."""
    header = "<tr><th></th>" + "".join(
        f"<th style='writing-mode:vertical-rl;font-family:monospace;text-align:left'>{html.escape(printable(t))}</th>"
        for t in str_tokens
    ) + "</tr>"
    rows = []
    for name, values in zip(names, matrix.tolist()):
        scale = max(max((abs(v) for v in values), default=0.0), 1e-30)
        cells = "".join(
            f"<td title='{v:+.4g}' style='background:{relevance_color(v / scale)};min-width:14px'></td>" for v in values
        )
        rows.append(f"<tr><th style='text-align:left;font-family:monospace'>{html.escape(printable(name))}</th>{cells}"
                    f"<td style='color:#555'>±{scale:.3g}</td></tr>")
    bar = colour_bar_html(f"±1 = each {what}'s own max |R| (the number after the {what}); hover a cell for its value")
    return f"{bar}<table>{header}{''.join(rows)}</table>"


def explain_report_html(attribution, prompt: str, continuation: str, model_name: str) -> str:
    """The CLI's report: heatmap, layer × token trace and the conservation table, in one page."""
    n = attribution.lengths[0]
    names, trace = attribution.layer_trace(0)
    conservation = attribution.conservation
    cons_rows = "".join(
        f"<tr><td style='text-align:left'>{html.escape(printable(p))}</td><td>{float(s):.5g}</td>"
        f"<td>{'' if i == 0 else f'{float(conservation.absorbed[0, i - 1]):.4g}'}</td></tr>"
        for i, (p, s) in enumerate(zip(conservation.points, conservation.sums[0]))
    )
    body = (
        f"<p><b>model</b> {html.escape(printable(model_name))} &nbsp; <b>rules</b> {html.escape(printable(attribution.rules))}<br>"
        f"<b>prompt</b> {html.escape(printable(prompt))}<br>"
        f"<b>greedy continuation</b> {html.escape(printable(continuation))}<br>"
        f"<b>explained</b> {html.escape(printable(attribution.target_description))} = {float(attribution.target_value[0]):.4f}</p>"
        "<h3>Input tokens</h3>" + attribution_html(attribution, max_rows=1)
        + "<h3>Relevance per layer and token</h3>"
        + layer_token_table_html(attribution.str_tokens[0][:n], names, trace[:, :n])
        + "<h3>Conservation</h3><p>Σ relevance over the tokens at each residual point, and what the biases "
        "and the softmax absorbed between one point and the next.</p>"
        "<table><tr><th>point</th><th>Σ relevance</th><th>absorbed</th></tr>" + cons_rows + "</table>"
    )
    return html_page("cage_lens explanation", body)
