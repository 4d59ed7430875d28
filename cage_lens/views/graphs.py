"""Interactive, self-contained views of :class:`~cage_lens.CircuitGraph` and
:class:`~cage_lens.GenerationGraph` (see docs/results.md#viewer).

Circuit graphs: levels are rows (input at the bottom, the target level at the top), tokens are columns;
head or neuron nodes of one level and token sit side by side inside their cell. Generation graphs:
prompt and generated nodes on one line, each edge an arc from an earlier node into a generated node.
Node colour: signed value scaled by the largest |value| drawn (red supports the target, blue opposes
it); edge width: |value| scaled by the largest drawn edge, edge colour: its sign.

Each view is a static SVG (readable where scripts do not run, with native tooltips) plus the bundled
viewer script: hover for values and the strongest edges, click a node for its paths to the target, a
slider for an edge threshold. A page stays under :data:`cage_lens.views.viewer.PAGE_BUDGET_BYTES`: when a
graph has more edges (or nodes) than fit, the strongest are drawn and the page says how many were left out.
"""

from __future__ import annotations

import torch

from cage_lens.views.html import html_page
from cage_lens.views.terminal import relevance_color
from cage_lens.views.viewer import PAGE_BUDGET_BYTES, safe_text, token_strip, view_fragment, visible

__all__ = ["node_label", "graph_svg", "graph_fragment", "graph_html", "generation_fragment", "generation_html"]

_COL, _ROW, _LEFT, _BOTTOM, _TOP = 56, 70, 130, 70, 20
_POSITIVE, _NEGATIVE = "#c82828", "#2846c8"
MAX_EDGES, MAX_NODES = 1500, 600


def _edges_svg(edges, where, scale: float, curve=None) -> str:
    """Edges grouped by sign (colour and opacity inherited from the group); ``edges`` are
    ``(index, source, target, weight)`` with node indices into ``where``."""
    groups = {True: [], False: []}
    for k, s, t, w in edges:
        (x1, y1), (x2, y2) = where[s], where[t]
        width = f"{0.4 + 5.6 * abs(w) / scale:.2f}"
        if curve is None:
            shape = f"<line data-e='{k}' x1='{x1:.1f}' y1='{y1:.1f}' x2='{x2:.1f}' y2='{y2:.1f}' stroke-width='{width}'/>"
        else:
            shape = f"<path data-e='{k}' d='{curve(x1, y1, x2, y2)}' fill='none' stroke-width='{width}'/>"
        groups[w >= 0].append(shape)
    return "".join(f"<g stroke='{_POSITIVE if sign else _NEGATIVE}' stroke-opacity='0.55'>{''.join(shapes)}</g>"
                   for sign, shapes in groups.items() if shapes)


def _node_svg(i: int, x: float, y: float, r: float, value: float, scale: float, title: str) -> str:
    return (f"<circle data-i='{i}' cx='{x:.1f}' cy='{y:.1f}' r='{r:.1f}' fill='{relevance_color(value / scale)}' "
            f"stroke='#333' stroke-width='0.6'><title>{title}</title></circle>")


def _strongest(items: list, limit: int, magnitude) -> tuple[list, int]:
    if len(items) <= limit:
        return items, 0
    return sorted(items, key=lambda e: -abs(magnitude(e)))[:limit], len(items) - limit


def _within_budget(render, max_edges: int):
    """Render with at most ``max_edges`` edges, halving until the fragment fits the page budget."""
    while True:
        out = render(max_edges)
        if len(out[0].encode("utf-8")) <= PAGE_BUDGET_BYTES - 20_000 or max_edges == 0:  # room for the page around it
            return out
        max_edges //= 2


# ---------------------------------------------------------------------------- circuit graphs
def _circuit_parts(graph, max_edges: int, max_nodes: int):
    """(svg, data, notes) of a circuit graph."""
    listed = graph.node_list()
    target = graph.target_node
    nodes, dropped_nodes = _strongest(listed, max_nodes, lambda kv: kv[1])
    if dropped_nodes and all(k != target for k, _ in nodes):
        nodes = nodes[:-1] + [kv for kv in listed if kv[0] == target]
    index = {key: i for i, (key, _) in enumerate(nodes)}
    edges = []
    for es in graph.edges():
        src, tgt = graph.nodes[es.source], graph.nodes[es.target]
        for t, s, v in zip(es.targets.tolist(), es.sources.tolist(), es.values.tolist()):
            a, b = src.key(s), tgt.key(t)
            if a in index and b in index:
                edges.append((index[a], index[b], v))
    n_edges = len(edges)
    edges, dropped_edges = _strongest(edges, max_edges, lambda e: e[2])

    cells: dict[tuple, list] = {}
    for key, _ in nodes:
        cells.setdefault((key[0], key[-1]), []).append(key)
    n_rows = len(graph.levels)
    where, radius = {}, {}
    for (level, pos), keys in cells.items():
        y = _TOP + (n_rows - 1 - graph.levels.index(level)) * _ROW + _ROW / 2
        keys = sorted(keys, key=lambda k: k[1] if len(k) == 3 else -1)
        step = min(12.0, (_COL - 8) / max(1, len(keys)))
        for n, key in enumerate(keys):
            where[index[key]] = (_LEFT + pos * _COL + _COL / 2 + (n - (len(keys) - 1) / 2) * step, y)
            radius[index[key]] = min(6.0, max(1.5, step / 2 - 0.5))
    width = _LEFT + graph.n_pos * _COL + 20
    height = _TOP + n_rows * _ROW + _BOTTOM
    edge_scale = max((abs(w) for _, _, w in edges), default=1.0) or 1.0
    node_scale = max((abs(r) for _, r in nodes), default=1.0) or 1.0

    parts = [f"<svg class='cl-graph' xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' "
             "style='font-family:sans-serif;font-size:11px;background:#fff'>"]
    for row, level in enumerate(graph.levels):
        y = _TOP + (n_rows - 1 - row) * _ROW + _ROW / 2
        parts.append(f"<text x='4' y='{y + 4:.1f}' fill='#444'>{safe_text(level)}</text>"
                     f"<line x1='{_LEFT}' y1='{y:.1f}' x2='{width - 10}' y2='{y:.1f}' stroke='#eee'/>")
    order = sorted(range(len(edges)), key=lambda k: abs(edges[k][2]))  # strongest drawn last (on top)
    parts.append(_edges_svg([(k, *edges[k]) for k in order], where, edge_scale))
    for i, (key, r) in enumerate(nodes):
        token = graph.str_tokens[key[-1]]
        title = f"{safe_text(node_label(key))} {safe_text(repr(token))}: R = {r:+.4g}"
        parts.append(_node_svg(i, *where[i], radius[i], r, node_scale, title))
    base = _TOP + n_rows * _ROW + 12
    for pos, token in enumerate(graph.str_tokens):
        x = _LEFT + pos * _COL + _COL / 2
        weight = "bold" if pos == graph.position else "normal"
        parts.append(f"<text x='{x:.1f}' y='{base}' text-anchor='end' font-weight='{weight}' "
                     f"transform='rotate(-40 {x:.1f} {base})'>{safe_text(token)}</text>")
    parts.append("</svg>")

    data = {
        "valueName": "relevance",
        "nodes": [{"label": node_label(k), "token": graph.str_tokens[k[-1]], "value": r} for k, r in nodes],
        "edges": [[s, t, w] for s, t, w in edges],
        "targets": [index[target]] if target in index else [],
        "maxEdge": max((abs(w) for _, _, w in edges), default=0.0),
    }
    notes = []
    if dropped_nodes:
        notes.append(f"Showing the {len(nodes)} nodes with the largest |relevance| of {len(listed)} ({dropped_nodes} left out).")
    if dropped_edges:
        notes.append(f"Showing the {len(edges)} strongest edges of {n_edges} ({dropped_edges} left out to keep the page small).")
    return "".join(parts), data, notes


def node_label(key: tuple) -> str:
    """``"level@pos"`` or ``"level:unit@pos"`` (the node ids of :meth:`CircuitGraph.to_json`)."""
    return f"{key[0]}@{key[-1]}" if len(key) == 2 else f"{key[0]}:{key[1]}@{key[2]}"


def _input_strip(graph) -> str:
    """Input tokens coloured by the embedding-level relevance (scaled by its max |R| without BOS)."""
    emb = graph.nodes[graph.levels[0]].relevance
    scale = float(emb[1:].abs().max()) if emb.numel() > 1 else float(emb.abs().max())
    scale = scale or 1.0
    return token_strip(graph.str_tokens, (emb / scale).tolist(), emb.tolist(), bold={graph.position})


def graph_svg(graph, max_edges: int = MAX_EDGES, max_nodes: int = MAX_NODES) -> str:
    """The graph as one static ``<svg>`` (the ``max_edges`` strongest edges, ``max_nodes`` nodes)."""
    return _circuit_parts(graph, max_edges, max_nodes)[0]


def graph_fragment(graph, max_edges: int = MAX_EDGES, max_nodes: int = MAX_NODES) -> str:
    """The interactive view as an HTML fragment (a notebook output, or part of a page)."""
    def render(limit):
        svg, data, notes = _circuit_parts(graph, limit, max_nodes)
        return (view_fragment(svg, data, _input_strip(graph), notes),)

    return _within_budget(render, max_edges)[0]


def graph_html(graph, max_edges: int = MAX_EDGES, max_nodes: int = MAX_NODES) -> str:
    """A complete page: summary, the interactive view and the per-transition metrics table."""
    rows = "".join(
        f"<tr><td style='text-align:left'>{safe_text(m['transition'])}</td><td>{m['nodes']}</td><td>{m['edges']}</td>"
        f"<td>{m['verticality']:.2f}</td><td>{m['tokens_90']}</td><td>{m['look_back']:.2f}</td>"
        f"<td style='text-align:left'>{', '.join(f'{safe_text(repr(t))}@{p}' for p, t, _ in m['hubs'])}</td></tr>"
        for m in graph.metrics()
    )
    table = ("<table><tr><th>transition</th><th>nodes</th><th>edges</th><th>verticality</th><th>tokens 90%</th>"
             f"<th>look-back</th><th>hubs</th></tr>{rows}</table>")
    body = (f"<p>{safe_text(graph.summary())}</p><p>Rows: levels (input at the bottom); columns: tokens. "
            "Red supports the target, blue opposes it; edge width ∝ |relevance|. Hover a node for its values, "
            "click it for its paths to the target, move the slider to hide weak edges.</p>"
            f"{graph_fragment(graph, max_edges, max_nodes)}<h3>Per-transition metrics</h3>{table}")
    return html_page("cage_lens attribution graph", body)


# ---------------------------------------------------------------------------- generation graphs
def _arc(x1, y1, x2, y2) -> str:
    h = min(0.45 * abs(x2 - x1) + 8, 160)
    return f"M{x1:.1f} {y1:.1f}Q{(x1 + x2) / 2:.1f} {y1 - h:.1f} {x2:.1f} {y2:.1f}"


def _generation_parts(g, max_edges: int):
    P, Y = g.n_prompt, g.n_generated
    n = P + Y
    context = g.context_attribution()
    entering = g.intermediate_contributions()
    values = context.tolist() + entering.tolist()
    edges = [(j, P + t, float(g.adjacency[t, j])) for t in range(Y) for j in range(P + t) if g.adjacency[t, j] != 0]
    n_edges = len(edges)
    edges, dropped = _strongest(edges, max_edges, lambda e: e[2])
    col = 40
    base_y = 190
    where = {i: (_LEFT / 2 + i * col + col / 2, base_y) for i in range(n)}
    width = int(_LEFT / 2 + n * col + 20)
    height = base_y + 90
    edge_scale = max((abs(w) for _, _, w in edges), default=1.0) or 1.0
    prompt_scale = float(context.abs().max()) or 1.0
    gen_scale = float(entering.abs().max()) or 1.0
    parts = [f"<svg class='cl-graph' xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' "
             "style='font-family:sans-serif;font-size:11px;background:#fff'>"]
    order = sorted(range(len(edges)), key=lambda k: abs(edges[k][2]))
    parts.append(_edges_svg([(k, *edges[k]) for k in order], where, edge_scale, curve=_arc))
    for i in range(n):
        label, value = g.labels[i], values[i]
        what = "CAGE attribution" if i < P else "enters here"
        title = f"{i} {safe_text(repr(label))}: {what} {value:+.4g}"
        scale = prompt_scale if i < P else gen_scale
        parts.append(_node_svg(i, *where[i], 6.0 if i < P else 7.0, value, scale, title))
    for i, label in enumerate(g.labels):
        x = where[i][0]
        y = base_y + 14
        weight = "normal" if i < P else "bold"
        parts.append(f"<text x='{x:.1f}' y='{y}' text-anchor='end' font-weight='{weight}' "
                     f"transform='rotate(-40 {x:.1f} {y})'>{safe_text(label)}</text>")
    parts.append("</svg>")
    data = {
        "valueName": "value",
        "nodes": [{"label": f"{'prompt' if i < P else 'generated'} {i} {visible(g.labels[i])}", "token": g.labels[i],
                   "value": values[i], "what": "CAGE attribution" if i < P else "enters here"} for i in range(n)],
        "edges": [[s, t, w] for s, t, w in edges],
        "targets": [n - 1],
        "maxEdge": max((abs(w) for _, _, w in edges), default=0.0),
    }
    notes = [f"Showing the {len(edges)} strongest edges of {n_edges} ({dropped} left out to keep the page small)."] if dropped else []
    if g.empty_rows:
        notes.append(f"Generated nodes whose row had no usable mass (set to zero): {g.empty_rows}.")
    scaled = (torch.cat([context / prompt_scale, torch.zeros(Y, dtype=context.dtype)])).tolist()
    strip = token_strip(g.labels, scaled, values, bold=set(range(P, n)))
    return "".join(parts), data, notes, strip


def _attribution_table(g) -> str:
    c, r = g.context_attribution(), g.row_attribution()
    scale = float(max(c.abs().max(), r.abs().max(), 1e-30))
    rows = "".join(
        f"<tr><td>{j}</td><td style='text-align:left;font-family:monospace'>{safe_text(g.labels[j])}</td>"
        f"<td style='background:{relevance_color(float(c[j]) / scale)}'>{float(c[j]):+.4f}</td>"
        f"<td style='background:{relevance_color(float(r[j]) / scale)}'>{float(r[j]):+.4f}</td></tr>"
        for j in range(g.n_prompt)
    )
    return f"<table><tr><th>#</th><th>prompt node</th><th>CAGE</th><th>row</th></tr>{rows}</table>"


def generation_fragment(g, max_edges: int = MAX_EDGES) -> str:
    """The interactive view of a generation graph and its CAGE vs row attribution table, as an HTML
    fragment (a notebook output, or part of a page)."""
    table = _attribution_table(g)

    def render(limit):
        svg, data, notes, strip = _generation_parts(g, limit)
        head = (f"<div><b>GenerationGraph</b> method={safe_text(g.method)} normalize={safe_text(g.normalize)}, "
                f"{g.n_prompt} prompt nodes, {g.n_generated} generated nodes</div>")
        return (head + view_fragment(svg, data, strip, notes) + "<h4>CAGE vs row attribution per prompt node</h4>" + table,)

    return _within_budget(render, max_edges)[0]


def generation_html(g, max_edges: int = MAX_EDGES) -> str:
    """A complete page: what is shown, the interactive view and the CAGE vs row attribution table."""
    body = ("<p>Prompt nodes are coloured by their CAGE attribution to the whole continuation (the token strip "
            "shows the same), generated nodes (bold) by the part of it that enters the generation there. Arcs: "
            "normalised edges into generated nodes. Hover a node for its values, click it for its paths to the "
            "last output, move the slider to hide weak edges.</p>"
            f"{generation_fragment(g, max_edges)}")
    return html_page("cage_lens generation graph", body)
