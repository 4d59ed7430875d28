"""Everything cage_lens draws (docs/index.md#views). Views read result objects; nothing here computes
relevance, and no result module is imported here.

- :mod:`~cage_lens.views.terminal`: the escape every shown token goes through, the colour scale, the
  ANSI heatmap of the CLI;
- :mod:`~cage_lens.views.html`: static HTML (token heatmaps, layer × token tables, the CLI report);
- :mod:`~cage_lens.views.viewer`: self-contained interactive pages (bundled script);
- :mod:`~cage_lens.views.graphs`: circuit and generation graphs as SVG + viewer data;
- :mod:`~cage_lens.views.plots`: matplotlib figures (extra ``plot``).
"""
