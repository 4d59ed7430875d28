"""Self-contained HTML/SVG view of a :class:`~cage_lens.circuit.CircuitGraph`.

Levels are rows (input at the bottom, the target level at the top), tokens are columns; head or neuron
nodes of one level and token are spread side by side inside their cell. Node colour: signed relevance
scaled by the largest |R| of the drawn nodes (red supports the target, blue opposes it); edge width:
|relevance| scaled by the largest drawn edge, edge colour: its sign. Inline SVG only: no scripts, no
external assets. Hover a node or an edge for its values.
"""

from __future__ import annotations

import html

from cage_lens.viz import html_page, printable, relevance_color

__all__ = ["graph_svg", "graph_html"]

_COL, _ROW, _LEFT, _BOTTOM, _TOP = 56, 70, 130, 70, 20


def _layout(graph):
    """Screen position of every drawn node key."""
    g = graph.to_networkx()
    units: dict[tuple[str, int], list] = {}
    for key in g.nodes:
        units.setdefault((key[0], key[-1]), []).append(key)
    n_rows = len(graph.levels)
    where = {}
    for (level, pos), keys in units.items():
        row = graph.levels.index(level)
        y = _TOP + (n_rows - 1 - row) * _ROW + _ROW / 2
        keys = sorted(keys, key=lambda k: k[1] if len(k) == 3 else -1)
        for n, key in enumerate(keys):
            offset = (n - (len(keys) - 1) / 2) * min(10.0, (_COL - 12) / max(1, len(keys)))
            where[key] = (_LEFT + pos * _COL + _COL / 2 + offset, y)
    return g, where


def graph_svg(graph, max_edges: int = 3000) -> str:
    """The graph as one inline ``<svg>`` element (the ``max_edges`` strongest edges are drawn)."""
    g, where = _layout(graph)
    width = _LEFT + graph.n_pos * _COL + 20
    height = _TOP + len(graph.levels) * _ROW + _BOTTOM
    edges = sorted(g.edges(data=True), key=lambda e: -abs(e[2]["weight"]))[:max_edges]
    edge_scale = max((abs(d["weight"]) for _, _, d in edges), default=1.0) or 1.0
    node_scale = max((abs(d["relevance"]) for _, d in g.nodes(data=True)), default=1.0) or 1.0
    parts = [f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' "
             f"style='font-family:sans-serif;font-size:11px;background:#fff'>"]
    for row, level in enumerate(graph.levels):
        y = _TOP + (len(graph.levels) - 1 - row) * _ROW + _ROW / 2
        parts.append(f"<text x='4' y='{y + 4:.1f}' fill='#444'>{html.escape(level)}</text>")
        parts.append(f"<line x1='{_LEFT}' y1='{y:.1f}' x2='{width - 10}' y2='{y:.1f}' stroke='#eee'/>")
    for a, b, d in reversed(edges):
        (x1, y1), (x2, y2) = where[a], where[b]
        w = d["weight"]
        colour = "rgb(200,40,40)" if w >= 0 else "rgb(40,70,200)"
        parts.append(
            f"<line x1='{x1:.1f}' y1='{y1:.1f}' x2='{x2:.1f}' y2='{y2:.1f}' stroke='{colour}' "
            f"stroke-opacity='0.55' stroke-width='{0.4 + 5.6 * abs(w) / edge_scale:.2f}'>"
            f"<title>{html.escape(str(a))} → {html.escape(str(b))}: {w:+.4g}</title></line>"
        )
    for key, d in g.nodes(data=True):
        x, y = where[key]
        r = d["relevance"]
        parts.append(
            f"<circle cx='{x:.1f}' cy='{y:.1f}' r='6' fill='{relevance_color(r / node_scale)}' stroke='#333' "
            f"stroke-width='0.6'><title>{html.escape(str(key))} {html.escape(repr(d['token']))}: R = {r:+.4g}</title></circle>"
        )
    base = _TOP + len(graph.levels) * _ROW + 12
    for pos, token in enumerate(graph.str_tokens):
        x = _LEFT + pos * _COL + _COL / 2
        weight = "bold" if pos == graph.position else "normal"
        parts.append(
            f"<text x='{x:.1f}' y='{base}' text-anchor='end' font-weight='{weight}' "
            f"transform='rotate(-40 {x:.1f} {base})'>{html.escape(printable(token))}</text>"
        )
    parts.append("</svg>")
    return "".join(parts)


def graph_html(graph) -> str:
    """A complete HTML page: summary, the SVG view and the per-transition metrics table."""
    rows = "".join(
        f"<tr><td style='text-align:left'>{html.escape(m['transition'])}</td><td>{m['nodes']}</td><td>{m['edges']}</td>"
        f"<td>{m['verticality']:.2f}</td><td>{m['tokens_90']}</td><td>{m['look_back']:.2f}</td>"
        f"<td style='text-align:left'>{html.escape(', '.join(f'{t!r}@{p}' for p, t, _ in m['hubs']))}</td></tr>"
        for m in graph.metrics()
    )
    table = ("<table><tr><th>transition</th><th>nodes</th><th>edges</th><th>verticality</th><th>tokens 90%</th>"
             f"<th>look-back</th><th>hubs</th></tr>{rows}</table>")
    body = (f"<p>{html.escape(graph.summary())}</p><p>Rows: levels (input at the bottom); columns: tokens. "
            "Red supports the target, blue opposes it; edge width ∝ |relevance|.</p>"
            f"<div style='overflow-x:auto'>{graph_svg(graph)}</div><h3>Per-transition metrics</h3>{table}")
    return html_page("cage_lens attribution graph", body)
