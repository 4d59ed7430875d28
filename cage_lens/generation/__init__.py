"""CAGE generation graphs (docs/cage.md): attribution across the steps of a generation, marginalised
over paths through earlier generated tokens.

- :mod:`~cage_lens.generation.graph`: ``cage_lens.cage`` and its result ``GenerationGraph``;
- :mod:`~cage_lens.generation.methods`: the base attribution methods that fill the table (AttnLRP,
  CP-LRP, Input×Gradient, integrated gradients, attention × IG, perturbation);
- :mod:`~cage_lens.generation.spans`: sentence and token spans, block sums.

The subpackage is called ``generation`` so that it cannot be confused with the function ``cage``.
"""
