"""Plots show the result's own numbers: image arrays, colour values, bar heights and edge widths are
compared with the result, not just the existence of a figure."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from cage_lens.attribution import attribute
from cage_lens.generation.graph import cage
from cage_lens.circuit.builder import circuit_graph
from cage_lens.errors import CageLensError
from conftest import cached_model

matplotlib = pytest.importorskip("matplotlib", reason="matplotlib (the 'plot' extra) is not installed")

PROMPT = "the cat sat on the mat and john"


def test_attribution_plot_shows_the_normalised_heatmap_and_the_layer_trace():
    attr = attribute(cached_model("gpt2"), [PROMPT, "the dog ran"], target=" mat")
    fig = attr.plot(row=1)
    top, bottom = fig.axes[:2]  # the two panels (their colour bars follow)
    n = attr.lengths[1]
    heat = top.images[0]
    np.testing.assert_array_equal(heat.get_array()[0], attr.normalized(1).numpy())
    assert heat.get_clim() == (-1, 1)
    names, trace = attr.layer_trace(1)
    layers = bottom.images[0]
    np.testing.assert_array_equal(layers.get_array(), trace[:, :n].numpy())
    limit = float(trace[:, 1:n].abs().max())  # BOS left out of the colour limits
    assert layers.get_clim() == (-limit, limit)
    assert [t.get_text() for t in bottom.get_yticklabels()] == names
    assert [t.get_text() for t in top.get_xticklabels()] == attr.str_tokens[1][:n]


def test_circuit_plot_draws_every_node_and_edge_with_its_value():
    graph = circuit_graph(cached_model("llama"), PROMPT, " mary", levels="heads", top_p=0.9)
    fig = graph.plot()
    ax = fig.axes[0]
    points = ax.collections[1]
    nodes = graph.node_list()
    np.testing.assert_array_equal(np.asarray(points.get_array()), [r for _, r in nodes])
    assert len(points.get_offsets()) == len(nodes)
    limit = max(abs(r) for _, r in nodes)
    assert points.get_clim() == (-limit, limit)
    lines = ax.collections[0]
    weights = [v for es in graph.edges() for v in es.values.tolist()]
    assert len(lines.get_segments()) == len(weights)
    largest = max(abs(w) for w in weights)
    np.testing.assert_allclose(lines.get_linewidths(), [0.3 + 3.0 * abs(w) / largest for w in weights], rtol=1e-12)
    red = matplotlib.colors.to_rgba("#c82828", alpha=0.6)
    assert [tuple(c) == red for c in lines.get_colors()] == [w >= 0 for w in weights]
    # every edge joins its two nodes' positions
    where = {k: tuple(xy) for (k, _), xy in zip(nodes, points.get_offsets())}
    es = graph.edges()[0]
    src, tgt = graph.nodes[es.source], graph.nodes[es.target]
    assert tuple(map(tuple, lines.get_segments()[0])) == (where[src.key(int(es.sources[0]))], where[tgt.key(int(es.targets[0]))])


def test_generation_plot_shows_cage_row_and_adjacency():
    g = cage(cached_model("gpt2"), PROMPT, completion=" mary went . john")
    fig = g.plot()
    bars, matrix = fig.axes[:2]
    heights = [p.get_height() for p in bars.patches]
    np.testing.assert_array_equal(heights[: g.n_prompt], g.context_attribution().numpy())
    np.testing.assert_array_equal(heights[g.n_prompt:], g.row_attribution().numpy())
    np.testing.assert_array_equal(matrix.images[0].get_array(), g.adjacency.numpy())


def test_missing_matplotlib_is_a_clear_error(monkeypatch):
    attr = attribute(cached_model("gpt2"), PROMPT)
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(CageLensError, match=r"pip install 'cage-lens\[plot\]'"):
        attr.plot()
