"""Matplotlib figures of results, for notebooks and papers (optional extra: ``pip install 'cage-lens[plot]'``).

Colours follow the rest of cage_lens: red supports the target, blue opposes it, on a scale symmetric
around zero. Every function returns a ``matplotlib.figure.Figure`` (not a pyplot figure: nothing is
shown twice in a notebook, and no global pyplot state is touched).

- :func:`plot_attribution`: the token heatmap (relevance ÷ max |R| over non-BOS tokens) and the
  layer × token relevance (raw values, colour limits ± the largest |R| outside BOS, an attention sink).
- :func:`plot_circuit`: nodes at (token, level), coloured by relevance; edges with width ∝ |value|.
- :func:`plot_generation`: CAGE vs row attribution per prompt node, and the normalised adjacency.
"""

from __future__ import annotations

from cage_lens.errors import CageLensError

__all__ = ["plot_attribution", "plot_circuit", "plot_generation"]

_CMAP = "bwr"
_POSITIVE, _NEGATIVE = "#c82828", "#2846c8"


def _matplotlib():
    try:
        import matplotlib  # noqa: F401
        from matplotlib.collections import LineCollection
        from matplotlib.figure import Figure
    except ImportError:
        raise CageLensError("plotting needs matplotlib, which is not installed: pip install 'cage-lens[plot]'") from None
    return Figure, LineCollection


def _labels(tokens) -> list[str]:
    from cage_lens.views.viewer import visible

    return [visible(t) for t in tokens]


def _symmetric(values) -> float:
    m = float(abs(values).max()) if values.numel() else 0.0
    return m if m > 0 else 1.0


def plot_attribution(attribution, row: int = 0, width: float | None = None):
    """Token heatmap (top) and layer × token relevance (bottom) of one row."""
    Figure, _ = _matplotlib()
    n = attribution.lengths[row]
    tokens = _labels(attribution.str_tokens[row][:n])
    names, trace = attribution.layer_trace(row)
    trace = trace[:, :n]
    fig = Figure(figsize=(width or max(6.0, 0.45 * n + 2.5), 1.6 + 0.32 * len(names)), layout="constrained")
    top, bottom = fig.subplots(2, 1, height_ratios=[1, max(2, len(names))])
    heat = top.imshow(attribution.normalized(row)[None, :].numpy(), cmap=_CMAP, vmin=-1, vmax=1, aspect="auto")
    top.set_yticks([])
    top.set_xticks(range(n), tokens, rotation=60, ha="right", fontsize=8)
    top.set_title(f"{attribution.rules}: {attribution.target_description} = {float(attribution.target_value[row]):.4g}", fontsize=9)
    fig.colorbar(heat, ax=top, label="R / max|R|")
    limit = _symmetric(trace[:, 1:] if n > 1 else trace)
    layers = bottom.imshow(trace.numpy(), cmap=_CMAP, vmin=-limit, vmax=limit, aspect="auto")
    bottom.set_yticks(range(len(names)), names, fontsize=7)
    bottom.set_xticks(range(n), tokens, rotation=60, ha="right", fontsize=8)
    fig.colorbar(layers, ax=bottom, label="relevance")
    return fig


def _circuit_layout(graph, nodes) -> dict:
    """(x, y) of every node key: x the token (units of one level and token spread inside ±0.35), y the level."""
    cells: dict[tuple, list] = {}
    for key, _ in nodes:
        cells.setdefault((key[0], key[-1]), []).append(key)
    where = {}
    for (level, pos), keys in cells.items():
        keys = sorted(keys, key=lambda k: k[1] if len(k) == 3 else -1)
        step = 0.7 / max(1, len(keys))
        for i, key in enumerate(keys):
            where[key] = (pos + (i - (len(keys) - 1) / 2) * step, graph.levels.index(level))
    return where


def plot_circuit(graph, ax=None):
    """The pruned graph (ancestors of the target) on a token × level grid. Node colour: relevance,
    limits ± the largest |R| drawn; edge width ``0.3 + 3·|value|/max|value|``, colour: its sign."""
    Figure, LineCollection = _matplotlib()
    if ax is None:
        fig = Figure(figsize=(max(6.0, 0.55 * graph.n_pos + 2.0), 1.0 + 0.75 * len(graph.levels)), layout="constrained")
        ax = fig.subplots()
    nodes = graph.node_list()
    where = _circuit_layout(graph, nodes)
    segments, widths, colours = [], [], []
    weights = [(src.key(s), tgt.key(t), v) for es in graph.edges()
               for src, tgt in [(graph.nodes[es.source], graph.nodes[es.target])]
               for t, s, v in zip(es.targets.tolist(), es.sources.tolist(), es.values.tolist())]
    largest = max((abs(v) for _, _, v in weights), default=1.0) or 1.0
    for a, b, v in weights:
        segments.append([where[a], where[b]])
        widths.append(0.3 + 3.0 * abs(v) / largest)
        colours.append(_POSITIVE if v >= 0 else _NEGATIVE)
    ax.add_collection(LineCollection(segments, linewidths=widths, colors=colours, alpha=0.6, zorder=1))
    values = [r for _, r in nodes]
    limit = max((abs(r) for r in values), default=1.0) or 1.0
    xy = [where[k] for k, _ in nodes]
    points = ax.scatter([x for x, _ in xy], [y for _, y in xy], c=values, cmap=_CMAP, vmin=-limit, vmax=limit,
                        s=40, edgecolors="#333", linewidths=0.5, zorder=2)
    ax.figure.colorbar(points, ax=ax, label="relevance")
    ax.set_yticks(range(len(graph.levels)), graph.levels, fontsize=8)
    ax.set_xticks(range(graph.n_pos), _labels(graph.str_tokens), rotation=60, ha="right", fontsize=8)
    ax.set_xlim(-0.6, graph.n_pos - 0.4)
    ax.set_ylim(-0.5, len(graph.levels) - 0.5)
    ax.set_title(f"{graph.target_description} = {graph.target_value:.4g} ({graph.rules}, {graph.level_mode})", fontsize=9)
    return ax.figure


def plot_generation(g):
    """CAGE vs row attribution per prompt node (bars, left) and the normalised adjacency (right)."""
    Figure, _ = _matplotlib()
    P, N = g.n_prompt, g.n_prompt + g.n_generated
    fig = Figure(figsize=(max(8.0, 0.35 * N + 6.0), 4.0), layout="constrained")
    bars, matrix = fig.subplots(1, 2, width_ratios=[max(1, P), max(1, N)])
    context, row = g.context_attribution().numpy(), g.row_attribution().numpy()
    x = range(P)
    bars.bar([i - 0.2 for i in x], context, width=0.4, color=_POSITIVE, label="CAGE (all paths)")
    bars.bar([i + 0.2 for i in x], row, width=0.4, color="#999999", label="row (direct edges)")
    bars.axhline(0, color="#333", linewidth=0.6)
    bars.set_xticks(list(x), _labels(g.labels[:P]), rotation=60, ha="right", fontsize=8)
    bars.legend(fontsize=8)
    bars.set_title(f"context attribution ({g.method}, {g.normalize})", fontsize=9)
    limit = _symmetric(g.adjacency)
    image = matrix.imshow(g.adjacency.numpy(), cmap=_CMAP, vmin=-limit, vmax=limit, aspect="auto")
    matrix.set_xticks(range(N), _labels(g.labels), rotation=60, ha="right", fontsize=7)
    matrix.set_yticks(range(g.n_generated), _labels(g.labels[P:]), fontsize=7)
    matrix.set_title("edges into generated nodes", fontsize=9)
    fig.colorbar(image, ax=matrix, label=f"normalised edge (±{limit:.3g})")
    return fig
