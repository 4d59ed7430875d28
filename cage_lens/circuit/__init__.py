"""Cross-layer attribution graphs (docs/graphs.md): ``cage_lens.circuit_graph`` and ``CircuitGraph``.

- :mod:`~cage_lens.circuit.builder`: ``circuit_graph`` — one forward and backward, the edges, pruning;
- :mod:`~cage_lens.circuit.graph`: the result (``CircuitGraph``, ``LevelNodes``, ``EdgeSet``);
- :mod:`~cage_lens.circuit.levels`: node levels and the transitions between them;
- :mod:`~cage_lens.circuit.state`: one forward + backward under the rules, everything the edges need;
- :mod:`~cage_lens.circuit.closed_form`: the edges in closed form (the default, ``method="fast"``);
- :mod:`~cage_lens.circuit.reference`: the same edges by batch-packed backpropagation (``"autograd"``);
- :mod:`~cage_lens.circuit.pruning`: pruning without recomputation, circuit-tracer's influence;
- :mod:`~cage_lens.circuit.export`: circuit-tracer's graph JSON.

The edge from node (s, i) to node (t, j) is ``A[j, i] = Σ_k h_s(i,k) ∂⟨h_t(j), g_t(j)⟩/∂h_s(i,k)``
with ``g_t(j) = ∂target/∂h_t(j)`` (gradients under the LRP rules) held fixed.
"""
