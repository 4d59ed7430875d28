"""CAGE generation graphs: attribution across generation steps, marginalised over paths (docs/cage.md).

>>> graph = cage(model, "a > b ; b > c ; start a :", max_new_tokens=2)
>>> graph.context_attribution()        # CAGE: all paths prompt → … → outputs
>>> graph.row_attribution()            # the baseline: direct edges only

Nodes are prompt and generated tokens (or sentences / user spans); edge ``j → t`` carries the
normalised attribution of generated node ``t`` to the earlier node ``j``. With ``A_YP`` (generated →
prompt) and ``A_YY`` (generated → earlier generated, strictly lower triangular), the context
attribution of output ``τ`` is ``c_τ = e_τᵀ (I − A_YY)⁻¹ A_YP`` = Σ_k e_τᵀ A_YYᵏ A_YP, computed with a
triangular solve.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass, field
from typing import Callable, Sequence

import networkx as nx
import torch
from jaxtyping import Float, Int

from cage_lens.errors import InputError
from cage_lens.generation.methods import DEFAULT_CHUNK, LRP_METHODS, check_sequence, get_method, plan_table
from cage_lens.generation.spans import Span, block_sum, check_tiling, span_pairs, split_sentences, token_spans
from cage_lens.inputs import as_int, check_token_ids, greedy_continuation, single_prompt, tokenize
from cage_lens.persist import Saveable, provenance
from cage_lens.views.terminal import printable

__all__ = ["cage", "GenerationGraph", "NORMALIZATIONS", "normalize_table", "greedy_continuation"]

NORMALIZATIONS = ("paper", "signed", "none")
PAPER_EPS = 1e-8  # the reference implementation's denominator guard (docs/cage.md#normalisation)


# ---------------------------------------------------------------------------- normalisation
def _causal_mask(n_rows: int, n_prompt: int) -> torch.Tensor:
    """``True`` where row t may have an edge: columns ``< n_prompt + t``."""
    cols = torch.arange(n_prompt + n_rows)
    return cols[None, :] < (n_prompt + torch.arange(n_rows))[:, None]


def check_normalization(how) -> None:
    """Refuse a ``normalize=`` value that is not one of :data:`NORMALIZATIONS` (before anything is computed)."""
    if how not in NORMALIZATIONS:
        raise InputError(f"unknown normalize={how!r}; choose one of {', '.join(NORMALIZATIONS)}")


def normalize_table(
    table: Float[torch.Tensor, "row node"], how: str
) -> tuple[Float[torch.Tensor, "row node"], list[int]]:
    """Normalise rows (docs/cage.md#normalisation). Returns the matrix and the rows that carried no mass.

    - ``"paper"``: ``max(T, 0) / (Σ max(T, 0) + 1e-8)`` (the reference's guard); a row with no positive
      entry becomes all zeros and is reported.
    - ``"signed"``: ``T / Σ|T|``, signs kept (inhibitory influence survives); an all-zero row stays zero
      and is reported.
    - ``"none"``: the table as is (rows that are all zero are reported).
    """
    check_normalization(how)
    if how == "paper":
        positive = table.clamp_min(0)
        mass = positive.sum(-1, keepdim=True)
        return positive / (mass + PAPER_EPS), (mass[:, 0] <= 0).nonzero().flatten().tolist()
    mass = table.abs().sum(-1, keepdim=True)
    empty = (mass[:, 0] == 0).nonzero().flatten().tolist()
    if how == "none":
        return table.clone(), empty
    return torch.where(mass > 0, table / torch.where(mass > 0, mass, torch.ones_like(mass)), torch.zeros_like(table)), empty


# ---------------------------------------------------------------------------- the graph
@dataclass
class GenerationGraph(Saveable):
    """A CAGE graph over ``n_prompt`` prompt nodes and ``Y`` generated nodes.

    ``adjacency[t, j]`` (``[Y, n_prompt + Y]``) is the normalised edge from node ``j`` into generated node
    ``t`` (node index ``n_prompt + t``); ``table`` is the same before normalisation. ``empty_rows`` lists
    generated nodes whose row had no usable mass (``"paper"``: no positive entry) and became zero.
    """

    adjacency: Float[torch.Tensor, "row node"]
    table: Float[torch.Tensor, "row node"]
    n_prompt: int
    normalize: str
    empty_rows: list[int]
    labels: list[str]
    spans: list[Span] | None = None
    method: str = "table"
    tokens: Int[torch.Tensor, "1 pos"] | None = None
    token_table: Float[torch.Tensor, "row pos"] | None = None
    meta: dict = field(default_factory=dict)

    # -------------------------------------------------------------- construction
    @classmethod
    def from_table(
        cls, table: Float[torch.Tensor, "row node"], n_prompt: int, normalize: str = "paper",
        labels: Sequence[str] | None = None, **extra,
    ) -> "GenerationGraph":
        """Build the graph from a raw attribution table ``[Y, n_prompt + Y]`` (row t explains generated
        node t from the nodes before it; entries at or after the node itself are ignored)."""
        table = torch.as_tensor(table).detach().to(torch.float64).cpu()
        if table.ndim != 2:
            raise InputError(f"the table must be 2-D [Y, n_prompt + Y], got shape {tuple(table.shape)}")
        Y, N = table.shape
        if Y == 0:
            raise InputError("the table has no rows: the continuation is empty, nothing to explain")
        if not isinstance(n_prompt, int) or n_prompt < 1 or N != n_prompt + Y:
            raise InputError(f"a table with {Y} generated rows needs n_prompt + {Y} columns; got {N} columns and n_prompt={n_prompt!r}")
        if not torch.isfinite(table).all():
            raise InputError("the table contains NaN or inf")
        table = torch.where(_causal_mask(Y, n_prompt), table, torch.zeros_like(table))
        adjacency, empty = normalize_table(table, normalize)
        labels = list(labels) if labels is not None else [f"p{j}" for j in range(n_prompt)] + [f"g{t}" for t in range(Y)]
        if len(labels) != N:
            raise InputError(f"got {len(labels)} labels for {N} nodes")
        return cls(adjacency, table, n_prompt, normalize, empty, labels, **extra)

    # -------------------------------------------------------------- shapes and blocks
    @property
    def n_generated(self) -> int:
        return self.adjacency.shape[0]

    @property
    def A_YP(self) -> Float[torch.Tensor, "row source"]:
        return self.adjacency[:, : self.n_prompt]

    @property
    def A_YY(self) -> Float[torch.Tensor, "row row"]:
        return self.adjacency[:, self.n_prompt :]

    def _selector(self, outputs) -> Float[torch.Tensor, "row"]:
        """Indicator over generated nodes: ``None`` = all, an int or a list of ints (negatives count
        from the end)."""
        Y = self.n_generated
        if outputs is None:
            return torch.ones(Y, dtype=torch.float64)
        items = [outputs] if as_int(outputs) is not None else list(outputs)
        e = torch.zeros(Y, dtype=torch.float64)
        for o in items:
            index = as_int(o)
            if index is None or not -Y <= index < Y:
                raise InputError(f"output {o!r} is not a generated node index in [-{Y}, {Y})")
            e[index] = 1
        return e

    def _path_weights(self, outputs) -> Float[torch.Tensor, "row"]:
        """``w = Σ_τ e_τᵀ (I − A_YY)⁻¹``: total weight of all paths from each generated node into the
        chosen outputs (1 for an output itself). Solved as ``w (I − A_YY) = e`` (lower triangular)."""
        identity = torch.eye(self.n_generated, dtype=torch.float64)
        e = self._selector(outputs)[None, :]
        return torch.linalg.solve_triangular(identity - self.A_YY, e, upper=False, left=False)[0]

    # -------------------------------------------------------------- attributions
    def row_attribution(self, outputs=None) -> Float[torch.Tensor, "source"]:
        """The baseline: direct edges only, ``Σ_τ A[τ, prompt]``."""
        return self._selector(outputs) @ self.A_YP

    def context_attribution(self, outputs=None) -> Float[torch.Tensor, "source"]:
        """CAGE: ``Σ_τ e_τᵀ (I − A_YY)⁻¹ A_YP`` over the chosen outputs (docs/cage.md#context-attribution)."""
        return self._path_weights(outputs) @ self.A_YP

    def context_matrix(self) -> Float[torch.Tensor, "row source"]:
        """``(I − A_YY)⁻¹ A_YP``: row τ is the context attribution of output τ alone."""
        identity = torch.eye(self.n_generated, dtype=torch.float64)
        return torch.linalg.solve_triangular(identity - self.A_YY, self.A_YP, upper=False)

    def entry_decomposition(self, outputs=None) -> Float[torch.Tensor, "row source"]:
        """Context attribution split by the generated node ``u`` through which paths leave the prompt:
        row u = ``w_u · A_YP[u]``. Rows sum to :meth:`context_attribution`."""
        return self._path_weights(outputs)[:, None] * self.A_YP

    def intermediate_contributions(self, outputs=None) -> Float[torch.Tensor, "row"]:
        """Per generated node, the part of the outputs' context attribution that enters the generation
        at that node (sums to the total context attribution)."""
        return self.entry_decomposition(outputs).sum(-1)

    def top_paths(self, source: int, output: int = -1, k: int = 5) -> list[tuple[float, list[int]]]:
        """The ``k`` paths (by |product of edge weights|) from prompt node ``source`` to generated node
        ``output``; each path is a list of node indices (prompt j, generated t as ``n_prompt + t``)."""
        P, Y = self.n_prompt, self.n_generated
        if as_int(source) is None or not 0 <= as_int(source) < P:
            raise InputError(f"source must be a prompt node index in [0, {P}), got {source!r}")
        if as_int(output) is None or not -Y <= as_int(output) < Y:
            raise InputError(f"output must be a generated node index in [-{Y}, {Y}), got {output!r}")
        source, output = as_int(source), as_int(output) % Y
        best: list[list[tuple[float, list[int]]]] = []
        for u in range(output + 1):
            cands = []
            if self.A_YP[u, source] != 0:
                cands.append((float(self.A_YP[u, source]), [source, P + u]))
            for v in range(u):
                edge = float(self.A_YY[u, v])
                if edge != 0:
                    cands += [(w * edge, path + [P + u]) for w, path in best[v]]
            best.append(sorted(cands, key=lambda c: -abs(c[0]))[:k])
        return best[output]

    # -------------------------------------------------------------- export
    def to_networkx(self) -> nx.DiGraph:
        """DAG: nodes ``0..N−1`` (``label``, ``kind`` prompt/generated, ``span``), edges forward in time
        into generated nodes with the normalised ``weight`` and the ``raw`` table value."""
        g = nx.DiGraph(method=self.method, normalize=self.normalize, n_prompt=self.n_prompt)
        for i, label in enumerate(self.labels):
            g.add_node(i, label=label, kind="prompt" if i < self.n_prompt else "generated",
                       span=None if self.spans is None else tuple(self.spans[i]))
        for t in range(self.n_generated):
            for j in range(self.n_prompt + t):
                w = float(self.adjacency[t, j])
                if w != 0:
                    g.add_edge(j, self.n_prompt + t, weight=w, raw=float(self.table[t, j]))
        return g

    def to_dict(self) -> dict:
        return {
            "method": self.method, "normalize": self.normalize, "n_prompt": self.n_prompt,
            "labels": self.labels, "spans": self.spans, "empty_rows": self.empty_rows,
            "adjacency": self.adjacency.tolist(), "table": self.table.tolist(),
            "row_attribution": self.row_attribution().tolist(),
            "context_attribution": self.context_attribution().tolist(),
        }

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    # -------------------------------------------------------------- display
    def _top(self, scores: torch.Tensor, k: int = 5) -> str:
        order = scores.abs().argsort(descending=True)[:k].tolist()
        return ", ".join(f"{self.labels[j]!r}@{j}: {float(scores[j]):+.3g}" for j in order)

    def __repr__(self) -> str:
        lines = [
            f"GenerationGraph(method={self.method!r}, normalize={self.normalize!r}, "
            f"{self.n_prompt} prompt nodes, {self.n_generated} generated nodes)",
            f"  generated: {' | '.join(printable(w) for w in self.labels[self.n_prompt:][:12])}"
            f"{' …' if self.n_generated > 12 else ''}",
            f"  CAGE top prompt nodes: {self._top(self.context_attribution())}",
            f"  row attribution top:   {self._top(self.row_attribution())}",
        ]
        if self.empty_rows:
            lines.append(f"  rows with no {'positive ' if self.normalize == 'paper' else ''}mass (set to zero): {self.empty_rows}")
        return "\n".join(printable(line) for line in lines)  # labels may come from a loaded file

    def _repr_html_(self) -> str:
        from cage_lens.views.graphs import generation_fragment

        return generation_fragment(self)

    def to_html(self, path=None) -> str:
        """Self-contained interactive HTML page (prompt and generated nodes on a line, edges as arcs;
        hover, click, threshold slider, CAGE heatmap; a static SVG where scripts do not run). Written
        to ``path`` when given; the HTML string is returned either way."""
        from cage_lens.views.graphs import generation_html

        page = generation_html(self)
        if path is not None:
            with open(path, "w", encoding="utf-8") as f:
                f.write(page)
        return page

    def plot(self, **kwargs):
        """Matplotlib figure: CAGE vs row attribution per prompt node and the adjacency (needs ``cage-lens[plot]``)."""
        from cage_lens.views.plots import plot_generation

        return plot_generation(self, **kwargs)


# ---------------------------------------------------------------------------- cage()
def _completion_tokens(model, completion) -> Int[torch.Tensor, "1 pos"]:
    if isinstance(completion, str):
        if not completion.strip():
            raise InputError("the completion is empty: there is no generated token to explain")
        return tokenize(model, completion, prepend_bos=False, role="the completion")[None]
    ids = check_token_ids(model, completion, role="the completion")
    if ids.shape[0] != 1:
        raise InputError(f"the completion must be one row of token ids, got shape {tuple(ids.shape)}")
    return ids


def _sequence(model, prompt, completion, max_new_tokens, prepend_bos, stop_at_eos) -> tuple[torch.Tensor, int]:
    """Prompt + continuation ``[1, pos]`` and the prompt length."""
    if completion is not None and max_new_tokens is not None:
        raise InputError("give either completion= (teacher forcing) or max_new_tokens= (greedy generation), not both")
    if completion is None and max_new_tokens is None:
        raise InputError("give completion= (teacher forcing) or max_new_tokens= (greedy generation)")
    prompt_ids = single_prompt(model, prompt, prepend_bos, "cage")
    n_prompt, n_ctx = prompt_ids.shape[1], int(model.cfg.n_ctx)
    if completion is not None:
        return torch.cat([prompt_ids, _completion_tokens(model, completion)], dim=1), n_prompt
    new_tokens = as_int(max_new_tokens)
    if new_tokens is None or new_tokens < 1:
        raise InputError(
            f"max_new_tokens must be a positive int (an empty continuation has nothing to explain), got {max_new_tokens!r}"
        )
    if n_prompt + new_tokens > n_ctx:
        raise InputError(
            f"the prompt has {n_prompt} tokens and the model's context (n_ctx) is {n_ctx}: "
            f"max_new_tokens={new_tokens} does not fit; at most {max(0, n_ctx - n_prompt)} new tokens do"
        )
    return greedy_continuation(model, prompt_ids, new_tokens, stop_at_eos), n_prompt


def _node_spans(model, tokens, n_prompt: int, granularity) -> list[Span] | None:
    """Spans of the graph nodes over the full sequence (``None`` for token level)."""
    T = tokens.shape[1]
    if granularity == "token":
        return None
    if granularity == "sentence":
        words = [str(s) for s in model.to_str_tokens(tokens[0])]
        return split_sentences(words[:n_prompt]) + split_sentences(words[n_prompt:], start=n_prompt)
    if isinstance(granularity, str):
        raise InputError(f"unknown granularity {granularity!r}; use 'token', 'sentence' or a list of (start, end) spans")
    spans = span_pairs(granularity, "granularity spans")
    ends = [b for _, b in spans]
    if ends and ends[-1] == n_prompt:  # prompt spans only: generated tokens stay single nodes
        spans += token_spans(n_prompt, T)
    spans = check_tiling(spans, T, "granularity spans")
    if n_prompt not in [a for a, _ in spans]:
        raise InputError(f"granularity spans must have a boundary at the end of the prompt (token {n_prompt})")
    return spans


def _check_options(fn: Callable, method, options: dict) -> None:
    """Refuse an option the method does not take (a misspelt ``chunk_sise=`` would otherwise be ignored)."""
    params = _parameters(fn)
    if params is None:   # a callable whose signature Python cannot read: it decides itself
        return
    unknown = [name for name in options if not _takes(params, name)]
    if unknown:
        taken = [p.name for p in params
                 if p.kind is p.KEYWORD_ONLY or (p.kind is p.POSITIONAL_OR_KEYWORD and p.default is not p.empty)]
        label = method if isinstance(method, str) else getattr(method, "__name__", "the method")
        raise InputError(f"method {label!r} has no option {', '.join(map(repr, unknown))}; "
                         f"its options: {', '.join(taken) or 'none'}")


def _parameters(fn: Callable) -> list[inspect.Parameter] | None:
    try:
        return list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return None


def _takes(params: list[inspect.Parameter], name: str) -> bool:
    return any(p.name == name or p.kind is p.VAR_KEYWORD for p in params)


def _accepts(fn: Callable, name: str) -> bool:
    return _takes(_parameters(fn) or [], name)


def cage(
    model,
    prompt: str | torch.Tensor,
    *,
    max_new_tokens: int | None = None,
    completion: str | torch.Tensor | Sequence[int] | None = None,
    method: str | Callable = "attnlrp",
    granularity: str | Sequence[Span] = "token",
    normalize: str = "paper",
    prepend_bos: bool | None = None,
    stop_at_eos: bool = False,
    **method_options,
) -> GenerationGraph:
    """Explain a continuation of ``prompt`` as a CAGE graph (docs/cage.md).

    Args:
        model: a TransformerLens ``HookedTransformer`` or ``TransformerBridge``.
        prompt: a string (tokenised by the input gate, :mod:`cage_lens.inputs`: the ids ``model.to_tokens``
            gives, BOS as the model does, refused where TransformerLens would truncate or map an unknown word) or token ids.
        max_new_tokens: greedy-generate this many tokens …
        completion: … or teacher-force this continuation (string or ids).
        method: a name in :data:`cage_lens.generation.methods.METHODS` or a callable with the same signature.
        granularity: ``"token"`` (prompt nodes align with the prompt's tokens, as the input gate gives them),
            ``"sentence"`` (built-in splitter; token scores summed per block) or explicit ``(start, end)``
            spans tiling the whole sequence, or only the prompt (generated tokens then stay single nodes).
        normalize: ``"paper"``, ``"signed"`` or ``"none"`` (see :func:`normalize_table`).
        method_options: passed to the method (``chunk_size``, ``steps`` …).
    """
    tokens, n_prompt = _sequence(model, prompt, completion, max_new_tokens, prepend_bos, stop_at_eos)
    check_sequence(model, tokens, n_prompt)
    check_normalization(normalize)
    fn = get_method(method)
    _check_options(fn, method, method_options)
    spans = _node_spans(model, tokens, n_prompt, granularity)
    if spans is not None and _accepts(fn, "spans"):
        method_options.setdefault("spans", spans)
    run_options, plan = dict(method_options), {}
    if isinstance(method, str) and method in LRP_METHODS:   # the pass and rows at once, decided (and recorded) here
        chosen = plan_table(model, tokens, n_prompt, LRP_METHODS[method], method_options.get("chunk_size", DEFAULT_CHUNK),
                            method_options.get("long_context"))
        plan = {"long_context": chosen.long_context, "rows_at_once": chosen.rows}
        run_options.update(chunk_size=chosen.rows, long_context=chosen.long_context)
    token_table = torch.as_tensor(fn(model, tokens, n_prompt, **run_options)).detach().double().cpu()
    Y, T = tokens.shape[1] - n_prompt, tokens.shape[1]
    if tuple(token_table.shape) != (Y, T):
        raise InputError(f"method {method!r} returned shape {tuple(token_table.shape)}, expected [{Y}, {T}]")
    words = [str(s) for s in model.to_str_tokens(tokens[0])]
    name = method if isinstance(method, str) else getattr(method, "__name__", "callable")
    meta = provenance(model, function="cage", method=name, granularity=granularity, normalize=normalize, n_prompt=n_prompt, completion=completion, max_new_tokens=max_new_tokens, prepend_bos=prepend_bos, stop_at_eos=stop_at_eos, method_options=method_options, **plan)
    if spans is None:
        return GenerationGraph.from_table(token_table, n_prompt, normalize, words, method=name, tokens=tokens, token_table=token_table, meta=meta)
    n_prompt_spans = sum(1 for _, b in spans if b <= n_prompt)
    table = block_sum(token_table, n_prompt, spans, n_prompt_spans)
    labels = ["".join(words[a:b]) if all(w.startswith(" ") for w in words[a + 1 : b]) else " ".join(words[a:b]) for a, b in spans]
    return GenerationGraph.from_table(table, n_prompt_spans, normalize, labels, spans=spans, method=name, tokens=tokens, token_table=token_table, meta=meta)
