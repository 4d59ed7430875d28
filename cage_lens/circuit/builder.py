"""Cross-layer attribution graphs (docs/graphs.md): nodes are (level, token) states, edges carry relevance.

``circuit_graph(model, prompt, target=..., contrast=...)`` runs one forward and one backward pass under
the LRP rules, computes the edges between consecutive levels (closed form by default, or the reference
batch-packed backpropagation) and prunes them:

1. **Node threshold.** Edges are computed only *into* target nodes with ``|R| > node_threshold·|target|``.
2. **Edge pruning per transition.** With ``edge_threshold``: keep ``|A| > edge_threshold·|target|``.
   Otherwise with ``top_p``: keep the smallest set of largest-|A| edges holding at least ``top_p`` of
   the transition's total |A| mass (ties broken by order of computation). ``top_p=None`` keeps all.
3. **Ancestors.** Keep the nodes from which the target node (last level, explained position) is
   reachable along kept edges, and the kept edges between them.

The unpruned matrices stay available through :meth:`CircuitGraph.edge_matrix` for inputs up to
``dense_limit`` tokens; above that only the pruned edges are stored, and no transition's matrix is
ever formed whole: its rows are computed a chunk at a time and pruned as they come
(:func:`~cage_lens.circuit.pruning.prune_chunks`). Long prompts run in the long-context mode
(docs/long_context.md), chosen from :func:`cage_lens.estimate` when the default pass would not fit.

The result is a :class:`~cage_lens.circuit.graph.CircuitGraph`; the edge machinery is the rest of this
subpackage: :mod:`~cage_lens.circuit.levels` (node levels and transitions), :mod:`~cage_lens.circuit.state`
(one forward + backward under the rules, everything the edges need), :mod:`~cage_lens.circuit.closed_form`
(the edges in closed form, ``method="fast"``) and :mod:`~cage_lens.circuit.reference` (batch-packed
backpropagation, ``method="autograd"``).
"""

from __future__ import annotations

import torch

from cage_lens.circuit.closed_form import fast_edge_chunks, fast_edge_rows
from cage_lens.circuit.graph import CircuitGraph, EdgeSet, LevelNodes
from cage_lens.circuit.levels import LEVEL_MODES
from cage_lens.circuit.levels import plan as plan_levels
from cage_lens.circuit.pruning import prune_chunks, prune_edges
from cage_lens.circuit.reference import autograd_edge_rows
from cage_lens.circuit.state import capture_state
from cage_lens.core.adapter import adapt
from cage_lens.core.certificate import certify_or_warn
from cage_lens.core.precision import check_precision
from cage_lens.core.rulesets import RuleSet, resolve_rules
from cage_lens.errors import InputError
from cage_lens.planning import check_long_context, choose_long_context
from cage_lens.inputs import check_number, resolve_positions, single_prompt
from cage_lens.persist import provenance
from cage_lens.targets import Target

__all__ = ["circuit_graph", "METHODS"]

METHODS = ("fast", "autograd")


# ---------------------------------------------------------------------------- building
def _check_options(levels, method, node_threshold, top_p, edge_threshold, neurons_top_k, batch_size, dense_limit) -> dict:
    """The numeric options through the input gate (finite, in range); the checked values by name."""
    if levels not in LEVEL_MODES:
        raise InputError(f"unknown levels {levels!r}; choose one of {', '.join(LEVEL_MODES)}")
    if method not in METHODS:
        raise InputError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    return dict(
        node_threshold=check_number(node_threshold, "node_threshold", low=0, allow_none=True),
        top_p=check_number(top_p, "top_p", low=0, high=1, low_open=True, allow_none=True),
        edge_threshold=check_number(edge_threshold, "edge_threshold", low=0, allow_none=True),
        neurons_top_k=check_number(neurons_top_k, "neurons_top_k", low=1, integer=True),
        batch_size=check_number(batch_size, "batch_size", low=1, integer=True),
        dense_limit=check_number(dense_limit, "dense_limit", low=0, integer=True),
    )


def _kept_rows(relevance: torch.Tensor, node_threshold: float | None, scale: float) -> torch.Tensor:
    if not node_threshold:
        return torch.arange(relevance.shape[0])
    return (relevance.abs() > node_threshold * scale).nonzero().flatten()


def circuit_graph(
    model,
    inputs,
    target=None,
    contrast=None,
    *,
    rules: "str | RuleSet" = "attnlrp",
    levels: str = "block",
    method: str = "fast",
    mode: str = "logit",
    position: int = -1,
    node_threshold: float | None = 0.01,
    top_p: float | None = 0.85,
    edge_threshold: float | None = None,
    neurons_top_k: int = 4,
    batch_size: int = 16,
    dense_limit: int = 512,
    long_context: bool | None = None,
    prepend_bos: bool | None = None,
    strict: bool = True,
    precision: str = "model",
) -> CircuitGraph:
    """Cross-layer attribution graph of one prompt (docs/graphs.md).

    Args:
        model: a TransformerLens ``HookedTransformer`` or ``TransformerBridge``.
        inputs: one prompt (string) or a ``[pos]`` / ``[1, pos]`` token tensor.
        target, contrast, mode, position: what is explained, as in :func:`cage_lens.attribute`
            (``target`` must be one token; default: the model's top-1 prediction).
        rules: ``"attnlrp"``, ``"cplrp"``, ``"gxi"`` or a :class:`cage_lens.RuleSet`.
        levels: ``"block"`` (embeddings, then each block's output), ``"half"`` (also the state between
            attention and MLP), ``"heads"`` (attention split into per-head nodes) or ``"neurons"``
            (MLPs split into their ``neurons_top_k`` most relevant neurons per token).
        method: ``"fast"`` (closed form, docs/graphs.md#closed-form) or ``"autograd"`` (reference batch-packed
            backpropagation, ``batch_size`` target rows per backward call). Same numbers.
        node_threshold: edges only into target nodes with ``|R| > node_threshold·|target|``
            (``None``/0: every node).
        top_p: keep per transition the smallest set of edges holding this fraction of |A| mass.
        edge_threshold: instead of ``top_p``, keep edges with ``|A| > edge_threshold·|target|``.
        dense_limit: keep the unpruned edge matrices (for :meth:`CircuitGraph.edge_matrix`) up to
            this many tokens.
        long_context: run the forward and backward pass in the long-context mode (blocks recomputed
            in the backward, attention in row chunks: the memory of one layer, about one more forward;
            docs/long_context.md). ``None`` chooses it when :func:`cage_lens.estimate` says the default
            pass would not fit the memory available, and refuses a run that would not fit either way.
        strict: refuse a model the completeness certificate does not pass (docs/rules.md);
            ``False`` computes anyway and records the reason in ``settings["warnings"]``.
        precision: ``"model"`` or ``"float32"`` (a 16-bit model computed on an exact float32 copy of
            its weights), as in :func:`cage_lens.attribute`.
    """
    check_precision(precision)
    options = _check_options(levels, method, node_threshold, top_p, edge_threshold, neurons_top_k, batch_size, dense_limit)
    node_threshold, top_p, edge_threshold = options["node_threshold"], options["top_p"], options["edge_threshold"]
    neurons_top_k, batch_size, dense_limit = options["neurons_top_k"], options["batch_size"], options["dense_limit"]
    adapter = adapt(model)
    rule_set = resolve_rules(rules)
    adapter.check_eval_mode()
    if levels == "neurons" and adapter.arch.attn_only:
        raise InputError("levels='neurons' needs MLPs but the model is attention-only")
    if levels == "neurons" and (adapter.arch.moe or adapter.arch.parallel):
        structure = "a mixture of experts" if adapter.arch.moe else "parallel attention + MLP blocks"
        raise InputError(f"levels='neurons' is not available for {structure}; use 'block', 'half' or 'heads'")
    warnings = certify_or_warn(adapter, strict)
    adapter = adapter.at_precision(precision)
    tokens = single_prompt(model, inputs, prepend_bos, "circuit_graph")[0]
    (pos,) = resolve_positions(position, [tokens.shape[0]])
    spec = Target.build(model, 1, target, contrast, mode)
    check_long_context(long_context)
    if long_context is None:
        long_context = choose_long_context(adapter.model, tokens.shape[0], "circuit_graph", rules=rule_set)
    state = capture_state(adapter, tokens, pos, spec, rule_set, bool(long_context), neurons=levels == "neurons")
    scale = abs(state.value)
    plan = plan_levels(adapter, state, levels, neurons_top_k)
    nodes = {lv.name: LevelNodes(lv.name, lv.kind, lv.layer, lv.relevance, lv.pos, lv.unit) for lv in plan.levels}
    edge_sets = []
    keep_dense = tokens.shape[0] <= dense_limit
    for tr in plan.transitions:
        rows = _kept_rows(nodes[tr.target.name].relevance, node_threshold, scale)
        dense = None
        if method == "fast" and not keep_dense:
            chunks = fast_edge_chunks(state, tr, rows)
            t_idx, s_idx, values, total = prune_chunks(chunks, rows, top_p=top_p, edge_threshold=edge_threshold, scale=scale)
        else:
            matrix = (fast_edge_rows(state, tr, rows) if method == "fast"
                      else autograd_edge_rows(adapter, state, tr, rows, batch_size)).cpu()
            t_idx, s_idx, values, total = prune_edges(matrix, rows, top_p=top_p, edge_threshold=edge_threshold, scale=scale)
            if keep_dense:
                dense = torch.zeros(nodes[tr.target.name].size, matrix.shape[1], dtype=matrix.dtype)
                dense[rows] = matrix
            del matrix
        edge_sets.append(EdgeSet(tr.source.name, tr.target.name, tr.kind, t_idx, s_idx, values, rows, total, dense))
    str_tokens = list(model.to_str_tokens(tokens))
    graph = CircuitGraph(
        str_tokens=str_tokens, tokens=tokens, position=pos, rules=rule_set.name, method=method, level_mode=levels,
        target_description=spec.describe(model), target_value=state.value, nodes=nodes, edge_sets=edge_sets,
        settings={"node_threshold": node_threshold, "top_p": top_p, "edge_threshold": edge_threshold,
                  "dense_limit": dense_limit, "neurons_top_k": neurons_top_k, "mode": mode},
        rule_set=rule_set,
        meta=provenance(model, function="circuit_graph", rules=rule_set, target=spec.describe(model), target_ids=spec.target_ids, contrast_ids=spec.contrast_ids, levels=levels, method=method, mode=mode, position=position, node_threshold=node_threshold, top_p=top_p, edge_threshold=edge_threshold, neurons_top_k=neurons_top_k, batch_size=batch_size, dense_limit=dense_limit, long_context=long_context, prepend_bos=prepend_bos, strict=strict, precision=precision),
    )
    if warnings:
        graph.settings["warnings"] = warnings
    return graph
