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

from cage_lens.errors import CageLensError
from cage_lens.views.html import colour_bar_html, escaped, html_page, token_spans_html
from cage_lens.views.terminal import relevance_color, text_color
from cage_lens.views.viewer import PAGE_BUDGET_BYTES, view_fragment, visible

__all__ = ["node_label", "graph_svg", "graph_fragment", "graph_html", "generation_fragment", "generation_html",
           "METRIC_DEFINITIONS"]

_ROW, _LEFT, _BOTTOM, _TOP = 70, 130, 70, 34
_POSITIVE, _NEGATIVE = "#c82828", "#2846c8"
MAX_EDGES, MAX_NODES = 1500, 600
#: the edge mass a "show more" tier keeps per transition (top-p over the unpruned rows)
MORE_TOP_P = (0.95, 0.99, 1.0)
_LABEL_CHARS = 14

#: what the per-transition metric columns mean (docs/metrics.md#graph-metrics)
METRIC_DEFINITIONS = {
    "nodes": "nodes of the transition's target level in the drawn graph",
    "edges": "kept edges of the transition",
    "verticality": "share of the transition's |relevance| mass that stays at the same token position "
                   "(1: every edge is vertical; low: information moves between tokens)",
    "tokens 90%": "how many source tokens together hold 90 % of the transition's |relevance| mass",
    "look-back": "|relevance|-weighted mean distance (in tokens) from an edge's source back to its target position",
    "hubs": "the (up to) three source tokens with the largest outgoing |relevance| mass, with their share",
}


def _svg_open(width: float, height: float) -> str:
    """An ``<svg>`` that scales to its container (``viewBox``) but is never drawn larger than its own size."""
    return (f"<svg class='cl-graph' xmlns='http://www.w3.org/2000/svg' viewBox='0 0 {width:.0f} {height:.0f}' "
            f"width='{width:.0f}' height='{height:.0f}' preserveAspectRatio='xMidYMid meet' "
            f"style='font-family:sans-serif;font-size:11px;background:#fff;max-width:{width:.0f}px'>")


def _short(token: str) -> str:
    """A token label for the axis (the full token is in the tooltip)."""
    shown = visible(token)
    return shown if len(shown) <= _LABEL_CHARS else shown[: _LABEL_CHARS - 1] + "…"


def _tier_attr(tier: int) -> str:
    return f" data-tier='{tier}'" if tier else ""


def _edges_svg(edges, where, scale: float, curve=None) -> str:
    """Edges grouped by sign (colour and opacity inherited from the group); ``edges`` are
    ``(index, source, target, weight, tier)`` with node indices into ``where``."""
    groups = {True: [], False: []}
    for k, s, t, w, tier in edges:
        (x1, y1), (x2, y2) = where[s], where[t]
        width = f"{0.4 + 5.6 * abs(w) / scale:.2f}"
        if curve is None:
            shape = (f"<line data-e='{k}'{_tier_attr(tier)} x1='{x1:.1f}' y1='{y1:.1f}' x2='{x2:.1f}' y2='{y2:.1f}' "
                     f"stroke-width='{width}'/>")
        else:
            shape = f"<path data-e='{k}'{_tier_attr(tier)} d='{curve(x1, y1, x2, y2)}' fill='none' stroke-width='{width}'/>"
        groups[w >= 0].append(shape)
    return "".join(f"<g stroke='{_POSITIVE if sign else _NEGATIVE}' stroke-opacity='0.55'>{''.join(shapes)}</g>"
                   for sign, shapes in groups.items() if shapes)


def _node_svg(i: int, x: float, y: float, r: float, value: float, scale: float, title: str, tier: int = 0) -> str:
    return (f"<circle data-i='{i}'{_tier_attr(tier)} cx='{x:.1f}' cy='{y:.1f}' r='{r:.1f}' "
            f"fill='{relevance_color(value / scale)}' stroke='#333' stroke-width='0.6'><title>{title}</title></circle>")


def _target_mark(x: float, y: float, r: float) -> str:
    """A dashed ring and a label on the target node (not a node: it takes no clicks)."""
    return (f"<circle class='cl-target' cx='{x:.1f}' cy='{y:.1f}' r='{r + 4:.1f}' fill='none' stroke='#000' "
            f"stroke-width='1.2' stroke-dasharray='3 2' pointer-events='none'/>"
            f"<text x='{x:.1f}' y='{y - r - 7:.1f}' text-anchor='middle' font-weight='bold' fill='#000'>target</text>")


def _strongest(items: list, limit: int, magnitude) -> tuple[list, int]:
    if len(items) <= limit:
        return items, 0
    return sorted(items, key=lambda e: -abs(magnitude(e)))[:limit], len(items) - limit


def _within_budget(render, max_edges: int):
    """Render with at most ``max_edges`` edges, halving until the fragment fits the page budget."""
    while True:
        out = render(max_edges)
        if len(out[0].encode("utf-8")) <= PAGE_BUDGET_BYTES - 30_000 or max_edges == 0:  # room for the page around it
            return out
        max_edges //= 2


# ---------------------------------------------------------------------------- circuit graphs
def _graph_edges(graph) -> dict[tuple, float]:
    """``{(source key, target key): value}`` of the graph's (ancestor-restricted) edges."""
    out = {}
    for es in graph.edges():
        src, tgt = graph.nodes[es.source], graph.nodes[es.target]
        for t, s, v in zip(es.targets.tolist(), es.sources.tolist(), es.values.tolist()):
            out[(src.key(s), tgt.key(t))] = v
    return out


def _pruning_rule(settings: dict) -> str:
    """How the graph's edges were pruned, in words."""
    pruning = settings.get("pruning")
    if pruning:
        return (f"circuit-tracer's influence pruning (nodes holding {pruning.get('node_influence')} of the influence, "
                f"edges holding {pruning.get('edge_influence')} of the edge score)")
    if settings.get("edge_threshold") is not None:
        return f"edges with |A| > {settings['edge_threshold']}·|target| (edge_threshold={settings['edge_threshold']})"
    top_p = settings.get("top_p")
    if top_p is not None and top_p < 1:
        return f"per transition, the strongest edges holding {top_p:.0%} of its |relevance| mass (top_p={top_p})"
    return "no edge pruning (every computed edge)"


def _tiers(graph, max_edges: int, max_nodes: int) -> list[tuple[str, object]]:
    """``(label, graph)`` of what the page can show: the graph as built, then the same rows pruned less
    (while the union still fits ``max_edges`` / ``max_nodes``; only when the graph kept its unpruned rows)."""
    built = graph.settings.get("top_p")
    tiers = [(f"as built: {_pruning_rule(graph.settings)}", graph)]
    if graph.settings.get("pruning") is None and graph.settings.get("edge_threshold") is None and (built is None or built >= 1):
        return tiers
    edges = set(_graph_edges(graph))
    nodes = {k for k, _ in graph.node_list()}
    for top_p in MORE_TOP_P:
        if built is not None and top_p <= built:
            continue
        try:
            more = graph.prune(top_p=top_p)
        except CageLensError:
            return tiers  # only the pruned edges were kept: nothing more to show
        edges |= set(_graph_edges(more))
        nodes |= {k for k, _ in more.node_list()}
        if len(edges) > max_edges or len(nodes) > max_nodes:
            break
        label = "every computed edge (top_p=1)" if top_p >= 1 else f"more: edges holding {top_p:.0%} of each transition's mass"
        tiers.append((label, more))
    return tiers


def _column_width(cells: dict) -> float:
    """Enough room for the largest number of nodes sharing one (level, token) cell."""
    most = max((len(keys) for keys in cells.values()), default=1)
    return float(min(56, max(30, 8 + 12 * most)))


def _hidden_tokens(graph, shown: set) -> str:
    """The input tokens without a node in the drawn graph, largest |R| first (a note for the page)."""
    first = graph.levels[0]
    relevance = graph.node_relevance(first)
    if relevance.dim() != 1:
        return ""
    missing = [(p, float(relevance[p])) for p in range(graph.n_pos) if (first, p) not in shown]
    if not missing:
        return ""
    missing.sort(key=lambda pr: -abs(pr[1]))
    listed = ", ".join(f"{visible(repr(graph.str_tokens[p]))}@{p} {r:+.3g}" for p, r in missing[:5])
    more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
    return (f"{len(missing)} of {graph.n_pos} input tokens have no node in this view (the token strip shows every "
            f"token): {listed}{more}.")


def _circuit_parts(graph, max_edges: int, max_nodes: int):
    """(svg, data, notes, tier labels) of a circuit graph."""
    tiers = _tiers(graph, max_edges, max_nodes)
    node_tier: dict[tuple, int] = {}
    edge_tier: dict[tuple, tuple[float, int]] = {}
    relevance: dict[tuple, float] = {}
    for k, (_, g) in enumerate(tiers):
        for key, r in g.node_list():
            node_tier.setdefault(key, k)
            relevance[key] = r
        for pair, v in _graph_edges(g).items():
            edge_tier.setdefault(pair, (v, k))
    listed = sorted(node_tier, key=lambda key: (node_tier[key], graph.levels.index(key[0]), key[-1], key[1] if len(key) == 3 else -1))
    target = graph.target_node
    nodes, dropped_nodes = _strongest([(key, relevance[key]) for key in listed], max_nodes, lambda kv: kv[1])
    if dropped_nodes and all(k != target for k, _ in nodes):
        nodes = nodes[:-1] + [(target, relevance[target])]
    index = {key: i for i, (key, _) in enumerate(nodes)}
    edges = [(index[a], index[b], v, tier) for (a, b), (v, tier) in edge_tier.items() if a in index and b in index]
    n_edges = len(edges)
    edges, dropped_edges = _strongest(edges, max_edges, lambda e: e[2])

    cells: dict[tuple, list] = {}
    for key, _ in nodes:
        cells.setdefault((key[0], key[-1]), []).append(key)
    col = _column_width(cells)
    n_rows = len(graph.levels)
    where, radius = {}, {}
    for (level, pos), keys in cells.items():
        y = _TOP + (n_rows - 1 - graph.levels.index(level)) * _ROW + _ROW / 2
        keys = sorted(keys, key=lambda k: k[1] if len(k) == 3 else -1)
        step = min(12.0, (col - 8) / max(1, len(keys)))
        for n, key in enumerate(keys):
            where[index[key]] = (_LEFT + pos * col + col / 2 + (n - (len(keys) - 1) / 2) * step, y)
            radius[index[key]] = min(6.0, max(1.5, step / 2 - 0.5))
    width = _LEFT + graph.n_pos * col + 20
    height = _TOP + n_rows * _ROW + _BOTTOM
    edge_scale = max((abs(e[2]) for e in edges), default=1.0) or 1.0
    node_scale = max((abs(r) for _, r in nodes), default=1.0) or 1.0

    parts = [_svg_open(width, height)]
    for row, level in enumerate(graph.levels):
        y = _TOP + (n_rows - 1 - row) * _ROW + _ROW / 2
        parts.append(f"<text x='4' y='{y + 4:.1f}' fill='#444'>{escaped(level)}</text>"
                     f"<line x1='{_LEFT}' y1='{y:.1f}' x2='{width - 10}' y2='{y:.1f}' stroke='#eee'/>")
    order = sorted(range(len(edges)), key=lambda k: abs(edges[k][2]))  # strongest drawn last (on top)
    parts.append(_edges_svg([(k, *edges[k]) for k in order], where, edge_scale))
    tier_of = {key: node_tier[key] for key, _ in nodes}
    for i, (key, r) in enumerate(nodes):
        token = graph.str_tokens[key[-1]]
        title = f"{escaped(node_label(key))} {escaped(repr(token))}: R = {r:+.4g}"
        parts.append(_node_svg(i, *where[i], radius[i], r, node_scale, title, tier_of[key]))
    if target in index:
        parts.append(_target_mark(*where[index[target]], radius[index[target]]))
    base = _TOP + n_rows * _ROW + 12
    for pos, token in enumerate(graph.str_tokens):
        x = _LEFT + pos * col + col / 2
        weight = "bold" if pos == graph.position else "normal"
        parts.append(f"<text x='{x:.1f}' y='{base}' text-anchor='end' font-weight='{weight}' "
                     f"transform='rotate(-40 {x:.1f} {base})'>{escaped(_short(token))}</text>")
    parts.append("</svg>")

    data = {
        "valueName": "relevance",
        "nodes": [{"label": node_label(k), "token": graph.str_tokens[k[-1]], "value": r, "tier": tier_of[k]} for k, r in nodes],
        "edges": [[s, t, w, tier] for s, t, w, tier in edges],
        "targets": [index[target]] if target in index else [],
        "maxEdge": max((abs(e[2]) for e in edges), default=0.0),
    }
    shown = {key for key, _ in nodes if tier_of[key] == 0}
    threshold = graph.settings.get("node_threshold")
    built = sum(1 for key in tier_of if tier_of[key] == 0)
    notes = [f"Pruned graph ({built} nodes, {sum(1 for e in edges if e[3] == 0)} edges): {_pruning_rule(graph.settings)}"
             + (f"; relevance flows computed only into nodes with |R| > {threshold}·|target| (node_threshold={threshold})"
                if threshold else "")
             + "; only nodes with a path to the target are drawn."
             + (" Choose 'show' above the graph to draw more of the computed edges." if len(tiers) > 1 else
                " Recompute with circuit_graph(..., top_p=None) to see every edge.")]
    hidden = _hidden_tokens(graph, shown)
    if hidden:
        notes.append(hidden)
    if dropped_nodes:
        notes.append(f"Showing the {len(nodes)} nodes with the largest |relevance| of {len(listed)} ({dropped_nodes} left out).")
    if dropped_edges:
        notes.append(f"Showing the {len(edges)} strongest edges of {n_edges} ({dropped_edges} left out to keep the page small).")
    labels = [f"{label} — {sum(1 for k in tier_of if tier_of[k] <= t)} nodes, {sum(1 for e in edges if e[3] <= t)} edges"
              for t, (label, _) in enumerate(tiers)]
    return "".join(parts), data, notes, labels, node_scale


def node_label(key: tuple) -> str:
    """``"level@pos"`` or ``"level:unit@pos"`` (the node ids of :meth:`CircuitGraph.to_json`)."""
    return f"{key[0]}@{key[-1]}" if len(key) == 2 else f"{key[0]}:{key[1]}@{key[2]}"


def _input_strip(graph) -> tuple[str, float]:
    """Input tokens coloured by the embedding-level relevance (scaled by its max |R| without BOS), and that scale."""
    emb = graph.nodes[graph.levels[0]].relevance
    scale = float(emb[1:].abs().max()) if emb.numel() > 1 else float(emb.abs().max())
    scale = scale or 1.0
    return token_spans_html(graph.str_tokens, (emb / scale).tolist(), emb.tolist(), bold={graph.position}), scale


def graph_svg(graph, max_edges: int = MAX_EDGES, max_nodes: int = MAX_NODES) -> str:
    """The graph as one static ``<svg>`` (the ``max_edges`` strongest edges, ``max_nodes`` nodes)."""
    return _circuit_parts(graph, max_edges, max_nodes)[0]


def graph_fragment(graph, max_edges: int = MAX_EDGES, max_nodes: int = MAX_NODES) -> str:
    """The interactive view as an HTML fragment (a notebook output, or part of a page): what was
    pruned, the input strip, colour bars, controls and the graph."""
    strip, strip_scale = _input_strip(graph)

    def render(limit):
        svg, data, notes, tiers, node_scale = _circuit_parts(graph, limit, max_nodes)
        legend = (colour_bar_html(f"token strip: ±1 = max |R| of the input tokens after BOS ({strip_scale:.3g})")
                  + "<br>" + colour_bar_html(f"nodes: ±1 = the largest |R| of any node drawn ({node_scale:.3g}); "
                                             "edge width ∝ |value|, edge colour its sign"))
        return (view_fragment(svg, data, strip, notes, legend, tiers),)

    return _within_budget(render, max_edges)[0]


def _metrics_table(graph) -> str:
    rows = "".join(
        f"<tr><td style='text-align:left'>{escaped(m['transition'])}</td><td>{m['nodes']}</td><td>{m['edges']}</td>"
        f"<td>{m['verticality']:.2f}</td><td>{m['tokens_90']}</td><td>{m['look_back']:.2f}</td>"
        f"<td style='text-align:left'>{', '.join(f'{escaped(repr(t))}@{p} ({share:.0%})' for p, t, share in m['hubs'])}</td></tr>"
        for m in graph.metrics()
    )
    heads = "".join(f"<th title='{escaped(text)}'>{escaped(name)}</th>" for name, text in METRIC_DEFINITIONS.items())
    definitions = "".join(f"<dt>{escaped(name)}</dt><dd>{escaped(text)}</dd>" for name, text in METRIC_DEFINITIONS.items())
    return (f"<table><tr><th>transition</th>{heads}</tr>{rows}</table>"
            f"<p>What the columns mean (computed on the drawn, pruned graph):</p><dl class='cl-defs'>{definitions}</dl>")


def graph_html(graph, max_edges: int = MAX_EDGES, max_nodes: int = MAX_NODES) -> str:
    """A complete page: summary, the interactive view, how to read it and the per-transition metrics."""
    body = (f"<p>{escaped(graph.summary())}</p>"
            f"{graph_fragment(graph, max_edges, max_nodes)}"
            "<h3>How to read the graph</h3><p>Rows: levels (input at the bottom, the target at the top); columns: "
            "tokens. Node colour: signed relevance (red supports the target, blue opposes it); edge width ∝ |relevance "
            "flowing along it|. Hover a node for its values and strongest edges, click it for its paths to the target, "
            "drag to pan, ctrl + wheel or the +/− buttons to zoom, 'fit' to see everything; the slider hides weak "
            "edges.</p><h3>Per-transition metrics</h3>" + _metrics_table(graph))
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
    edges = [(j, P + t, float(g.adjacency[t, j]), 0) for t in range(Y) for j in range(P + t) if g.adjacency[t, j] != 0]
    n_edges = len(edges)
    edges, dropped = _strongest(edges, max_edges, lambda e: e[2])
    col = 40
    base_y = 190
    where = {i: (_LEFT / 2 + i * col + col / 2, base_y) for i in range(n)}
    width = int(_LEFT / 2 + n * col + 20)
    height = base_y + 96
    edge_scale = max((abs(e[2]) for e in edges), default=1.0) or 1.0
    prompt_scale = float(context.abs().max()) or 1.0
    gen_scale = float(entering.abs().max()) or 1.0
    parts = [_svg_open(width, height)]
    order = sorted(range(len(edges)), key=lambda k: abs(edges[k][2]))
    parts.append(_edges_svg([(k, *edges[k]) for k in order], where, edge_scale, curve=_arc))
    for i in range(n):
        label, value = g.labels[i], values[i]
        what = "CAGE attribution" if i < P else "enters here"
        title = f"{i} {escaped(repr(label))}: {what} {value:+.4g}"
        scale = prompt_scale if i < P else gen_scale
        parts.append(_node_svg(i, *where[i], 6.0 if i < P else 7.0, value, scale, title))
    parts.append(_target_mark(*where[n - 1], 7.0))
    for i, label in enumerate(g.labels):
        x = where[i][0]
        y = base_y + 20  # below the node (radius 7)
        weight = "normal" if i < P else "bold"
        parts.append(f"<text x='{x:.1f}' y='{y}' text-anchor='end' font-weight='{weight}' "
                     f"transform='rotate(-40 {x:.1f} {y})'>{escaped(_short(label))}</text>")
    parts.append("</svg>")
    data = {
        "valueName": "value",
        "nodes": [{"label": f"{'prompt' if i < P else 'generated'} {i} {visible(g.labels[i])}", "token": g.labels[i],
                   "value": values[i], "what": "CAGE attribution" if i < P else "enters here", "tier": 0} for i in range(n)],
        "edges": [[s, t, w, tier] for s, t, w, tier in edges],
        "targets": [n - 1],
        "maxEdge": max((abs(e[2]) for e in edges), default=0.0),
    }
    notes = [f"Showing the {len(edges)} strongest edges of {n_edges} ({dropped} left out to keep the page small)."] if dropped else []
    if g.empty_rows:
        notes.append(f"Generated nodes whose row had no usable mass (set to zero): {g.empty_rows}.")
    scaled = (torch.cat([context / prompt_scale, torch.zeros(Y, dtype=context.dtype)])).tolist()
    strip = token_spans_html(g.labels, scaled, values, bold=set(range(P, n)))
    legend = (colour_bar_html(f"prompt nodes and token strip: ±1 = the largest |CAGE attribution| ({prompt_scale:.3g})")
              + "<br>" + colour_bar_html(f"generated nodes: ±1 = the largest part entering at one generated token "
                                         f"({gen_scale:.3g}); arc width ∝ |edge|"))
    return "".join(parts), data, notes, strip, legend


def _attribution_table(g) -> str:
    c, r = g.context_attribution(), g.row_attribution()
    scale = float(max(c.abs().max(), r.abs().max(), 1e-30))

    def cell(value: float) -> str:
        background = relevance_color(value / scale)
        return f"<td style='background:{background};color:{text_color(background)}'>{value:+.4f}</td>"

    rows = "".join(
        f"<tr><td>{j}</td><td style='text-align:left;font-family:monospace'>{escaped(g.labels[j])}</td>"
        f"{cell(float(c[j]))}{cell(float(r[j]))}</tr>"
        for j in range(g.n_prompt)
    )
    return (colour_bar_html(f"±1 = the largest |value| in this table ({scale:.3g})")
            + f"<table><tr><th>#</th><th>prompt node</th><th>CAGE</th><th>row</th></tr>{rows}</table>")


_GENERATION_HELP = (
    "<p>Prompt nodes are coloured by their CAGE attribution to the whole continuation (the token strip shows the "
    "same), generated nodes (bold) by the part of it that enters the generation there. Arcs: normalised edges into "
    "generated nodes; the target is the last generated token. CAGE follows every path through earlier generated "
    "tokens; 'row' counts only the direct edges (docs/cage.md). Hover a node for its values, click it for its paths "
    "to the last output, drag to pan, ctrl + wheel or +/− to zoom, move the slider to hide weak edges.</p>"
)


def generation_fragment(g, max_edges: int = MAX_EDGES) -> str:
    """The interactive view of a generation graph, how to read it, and its CAGE vs row attribution table,
    as an HTML fragment (a notebook output, or the body of a page: the CLI's and ``to_html``'s)."""
    table = _attribution_table(g)

    def render(limit):
        svg, data, notes, strip, legend = _generation_parts(g, limit)
        head = (f"<div><b>GenerationGraph</b> method={escaped(g.method)} normalize={escaped(g.normalize)}, "
                f"{g.n_prompt} prompt nodes, {g.n_generated} generated nodes</div>")
        return (head + view_fragment(svg, data, strip, notes, legend) + _GENERATION_HELP
                + "<h4>CAGE vs row attribution per prompt node</h4>" + table,)

    return _within_budget(render, max_edges)[0]


def generation_html(g, max_edges: int = MAX_EDGES) -> str:
    """A complete page: the interactive view, how to read it, and the CAGE vs row attribution table."""
    return html_page("cage_lens generation graph", generation_fragment(g, max_edges))
