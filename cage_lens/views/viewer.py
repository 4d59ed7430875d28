"""The interactive viewer's shared pieces: the bundled script, safe text, the fragment wrapper, and the
attribution page. See docs/results.md#viewer.

A view is one self-contained fragment (usable as a notebook output or inside a page): a static SVG that
reads on its own, a JSON data block, and the bundled ``assets/viewer.js`` (inlined; nothing is fetched)
that adds the tooltip, the click-to-highlight and the threshold slider when scripts run.
"""

from __future__ import annotations

import html
import json
import uuid
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Sequence

from cage_lens.views.html import after_bos_max, colour_bar_html, escaped, html_page, layer_token_table_html, token_spans_html
from cage_lens.views.terminal import printable

__all__ = ["visible", "script_json", "viewer_script", "view_fragment", "attribution_page", "PAGE_BUDGET_BYTES"]

PAGE_BUDGET_BYTES = 300_000

_STYLE = """
.cage-lens-view{font-family:sans-serif;font-size:12px;color:#222}
.cage-lens-view .cl-controls{display:none;margin:4px 0;gap:10px;align-items:center;flex-wrap:wrap}
.cage-lens-view.cl-live .cl-controls{display:flex}
.cage-lens-view .cl-slider{vertical-align:middle;width:200px}
.cage-lens-view .cl-controls button{font-size:12px;padding:1px 7px}
.cage-lens-view .cl-note{color:#7a2e00;margin:2px 0}
.cage-lens-view .cl-canvas{position:relative;overflow:hidden;border:1px solid #eee}
.cage-lens-view .cl-canvas svg.cl-graph{display:block;width:100%;height:auto;max-height:calc(100vh - 24px);touch-action:none}
.cage-lens-view.cl-live .cl-canvas svg.cl-graph{cursor:grab}
.cage-lens-view .cl-tip{display:none;position:fixed;z-index:50;background:#fffffb;border:1px solid #999;
 border-radius:4px;padding:4px 6px;font-family:monospace;font-size:11px;white-space:pre;pointer-events:none;
 box-shadow:0 1px 4px rgba(0,0,0,.25);max-width:calc(100vw - 16px);overflow:hidden}
.cage-lens-view .cl-tip-title{font-weight:bold}
.cage-lens-view .cl-strip span{display:inline-block;font-family:monospace;padding:1px 3px;margin:1px;border-radius:3px}
.cage-lens-view [data-i]{cursor:pointer}
.cage-lens-view [data-tier]:not([data-tier='0']){display:none}
.cage-lens-view.cl-focus [data-e]:not(.cl-on){stroke-opacity:.06}
.cage-lens-view.cl-focus [data-i]:not(.cl-on){opacity:.25}
.cage-lens-view [data-e].cl-on{stroke-opacity:.95}
.cage-lens-view [data-i].cl-on{stroke:#000;stroke-width:2}
"""


def visible(token: str) -> str:
    """A token with every control, format or separator character as a visible escape (the one
    sanitiser, :func:`cage_lens.views.terminal.printable`; still to be HTML-escaped)."""
    return printable(token)


def script_json(data) -> str:
    """JSON safe inside ``<script>``: no ``<``, ``>`` or ``&`` can end the block, and every non-ASCII
    character (line separators, bidi overrides) is a ``\\u`` escape, so no raw control text reaches the page."""
    text = json.dumps(data, ensure_ascii=True, allow_nan=False)
    for raw, escaped in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026")):
        text = text.replace(raw, escaped)
    return text


@lru_cache(maxsize=1)
def viewer_script() -> str:
    """The bundled viewer script (``cage_lens/assets/viewer.js``)."""
    return (resources.files("cage_lens") / "assets" / "viewer.js").read_text(encoding="utf-8")


def view_fragment(svg: str, data: dict, strip: str = "", notes: Sequence[str] = (), legend: str = "",
                  tiers: Sequence[str] = ()) -> str:
    """One self-contained view: controls (shown only when scripts run: zoom, fit, edge threshold and,
    with ``tiers``, how much of the graph to show), notes, legend, token strip, the static SVG with its
    tooltip box, the data and the script. The SVG scales to the window (``viewBox``); the script adds
    zoom (buttons, ctrl + wheel) and panning (drag)."""
    view_id = f"cl-{uuid.uuid4().hex[:12]}"
    note_html = "".join(f"<div class='cl-note'>{html.escape(n)}</div>" for n in notes)
    more = ""
    if len(tiers) > 1:
        options = "".join(f"<option value='{k}'>{html.escape(t)}</option>" for k, t in enumerate(tiers))
        more = f"<label>show <select class='cl-tier'>{options}</select></label>"
    start = (f"(function(){{var r=document.getElementById('{view_id}');"
             "window.cageLensViewer.graph(r,JSON.parse(r.querySelector('.cl-data').textContent));})();")
    return (
        f"<div class='cage-lens-view' id='{view_id}'><style>{_STYLE}</style>"
        f"{note_html}{legend}<div class='cl-strip'>{strip}</div>"
        "<div class='cl-controls'>"
        "<span><button type='button' class='cl-zoom-in' title='zoom in (or ctrl + wheel)'>+</button>"
        "<button type='button' class='cl-zoom-out' title='zoom out'>−</button>"
        "<button type='button' class='cl-fit' title='fit the whole graph into the window'>fit</button></span>"
        f"{more}"
        "<span>edge threshold <input type='range' class='cl-slider' min='0' max='1000' value='0'> "
        "<span class='cl-count'></span></span></div>"
        f"<div class='cl-canvas'>{svg}<div class='cl-tip'></div></div>"
        f"<script type='application/json' class='cl-data'>{script_json(data)}</script>"
        f"<script>{viewer_script()}\n{start}</script></div>"
    )


# ---------------------------------------------------------------------------- attribution page
def attribution_page(attribution, path=None, max_rows: int = 8) -> str:
    """A complete page for an :class:`~cage_lens.Attribution`: per row the token heatmap, the layer ×
    token relevance and the summed head relevance, then the conservation table."""
    sections = []
    n_rows = attribution.token_relevance.shape[0]
    for row in range(min(n_rows, max_rows)):
        n = attribution.lengths[row]
        tokens = attribution.str_tokens[row][:n]
        scaled = attribution.normalized(row).tolist()
        raw = attribution.token_relevance[row, :n].tolist()
        names, trace = attribution.layer_trace(row)
        heads = attribution.head_relevance[row, :, :, :n].sum(-1)  # [layer, head]
        head_names = [f"layer {l}" for l in range(heads.shape[0])]
        sections.append(
            f"<h3>Row {row}: {escaped(attribution.target_description)} = {float(attribution.target_value[row]):.6g}"
            f" at position {attribution.positions[row]}</h3>"
            + colour_bar_html(f"±1 = max |R| over the tokens after BOS ({after_bos_max(raw):.3g}); hover a token for its value")
            + f"<div class='cage-lens-view'><div class='cl-strip'>{token_spans_html(tokens, scaled, raw)}</div></div>"
            "<h4>Relevance per layer and token</h4>"
            + layer_token_table_html(tokens, names, trace[:, :n], what="layer")
            + "<h4>Head relevance summed over tokens (columns: heads)</h4>"
            + layer_token_table_html([str(h) for h in range(heads.shape[1])], head_names, heads, what="layer")
        )
    if n_rows > max_rows:
        sections.append(f"<p>Showing the first {max_rows} of {n_rows} rows.</p>")
    cons = attribution.conservation
    rows = "".join(
        f"<tr><td style='text-align:left'>{escaped(p)}</td>"
        + "".join(f"<td>{float(cons.sums[b, i]):.6g}</td>" for b in range(min(n_rows, max_rows))) + "</tr>"
        for i, p in enumerate(cons.points)
    )
    body = (
        f"<style>{_STYLE}</style><p><b>rules</b> {escaped(attribution.rules)} &nbsp; "
        "red supports the target, blue opposes it; BOS (an attention sink) is left out of the colour scales.</p>"
        + "".join(sections)
        + "<h3>Conservation: Σ relevance per point (columns: rows)</h3><table>" + rows + "</table>"
    )
    page = html_page("cage_lens attribution", body)
    if path is not None:
        Path(path).write_text(page, encoding="utf-8")
    return page
