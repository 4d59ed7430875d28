"""Cross-layer attribution graph machinery (docs/graphs.md).

- :mod:`cage_lens.graph.levels`: node levels and the transitions between them;
- :mod:`cage_lens.graph.state`: one forward + backward under the rules, everything the edges need;
- :mod:`cage_lens.graph.closed_form`: the edges in closed form (the default, ``method="fast"``);
- :mod:`cage_lens.graph.reference`: the same edges by batch-packed backpropagation (``"autograd"``).

The edge from node (s, i) to node (t, j) is ``A[j, i] = Σ_k h_s(i,k) ∂⟨h_t(j), g_t(j)⟩/∂h_s(i,k)``
with ``g_t(j) = ∂target/∂h_t(j)`` (gradients under the LRP rules) held fixed.
"""

from cage_lens.graph.closed_form import fast_edge_rows
from cage_lens.graph.levels import LEVEL_MODES, Level, Plan, Transition, plan, state_levels, transitions
from cage_lens.graph.reference import autograd_edge_rows
from cage_lens.graph.state import AttentionState, BranchState, ForwardState, MLPState, capture_state

__all__ = [
    "Level", "Transition", "Plan", "LEVEL_MODES", "state_levels", "transitions", "plan", "AttentionState",
    "MLPState", "BranchState", "ForwardState", "capture_state", "fast_edge_rows", "autograd_edge_rows",
]
