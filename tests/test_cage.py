"""CAGE generation graphs: hand-computed marginalisation, exact batched tables, cage() end to end."""

from __future__ import annotations

import functools
import json

import networkx as nx
import pytest
import torch

from cage_lens import methods
from cage_lens.core.adapter import adapt
from cage_lens.generation.graph import GenerationGraph, cage
from cage_lens.errors import CageLensError, InputError
from cage_lens.testing import random_model


PROMPT = "the cat sat on the mat . john went to the store ."
# The paper's normalisation divides each row by Σ + 1e-8: hand-computed fractions are off by at most
# 1e-8 / Σ (Σ ≥ 1 in the hand-made tables) — 1e-7 absolute bounds that with room to spare.
PAPER = dict(atol=1e-7, rtol=0)


@functools.lru_cache(maxsize=None)
def tiny(kind: str = "gpt2"):
    return random_model(kind, n_layers=2, dtype=torch.float64)


# ---------------------------------------------------------------------------- hand-made graph
# 2 prompt nodes, 3 generated nodes; columns [p0, p1, g0, g1, g2].
RAW = torch.tensor([
    [3.0, 1.0, 0.0, 0.0, 0.0],
    [1.0, 0.0, 1.0, 0.0, 0.0],
    [-1.0, 2.0, 1.0, 1.0, 0.0],
], dtype=torch.float64)


def test_paper_normalisation_and_cage_by_hand():
    g = GenerationGraph.from_table(RAW, n_prompt=2, normalize="paper")
    expected_A = torch.tensor([
        [0.75, 0.25, 0, 0, 0], [0.5, 0, 0.5, 0, 0], [0, 0.5, 0.25, 0.25, 0]], dtype=torch.float64)
    torch.testing.assert_close(g.adjacency, expected_A, **PAPER)
    # c0 = [.75, .25]; c1 = .5 e_p0 + .5 c0; c2 = .5 e_p1 + .25 c0 + .25 c1
    torch.testing.assert_close(g.context_matrix(), torch.tensor(
        [[0.75, 0.25], [0.875, 0.125], [0.40625, 0.59375]], dtype=torch.float64), **PAPER)
    torch.testing.assert_close(g.context_attribution(), torch.tensor([2.03125, 0.96875], dtype=torch.float64), **PAPER)
    torch.testing.assert_close(g.context_attribution(2), torch.tensor([0.40625, 0.59375], dtype=torch.float64), **PAPER)
    torch.testing.assert_close(g.row_attribution(), torch.tensor([1.25, 0.75], dtype=torch.float64), **PAPER)
    torch.testing.assert_close(g.row_attribution([-1]), torch.tensor([0.0, 0.5], dtype=torch.float64), **PAPER)
    assert g.empty_rows == []


def test_intermediate_contributions_and_paths_by_hand():
    g = GenerationGraph.from_table(RAW, n_prompt=2, normalize="paper")
    # w = e_2ᵀ (I − A_YY)⁻¹ = [.25 + .25·.5, .25, 1]; entering mass = w_u · Σ_j A_YP[u, j]
    torch.testing.assert_close(g.intermediate_contributions(2), torch.tensor([0.375, 0.125, 0.5], dtype=torch.float64), **PAPER)
    torch.testing.assert_close(g.entry_decomposition(2).sum(0), g.context_attribution(2))
    paths = g.top_paths(source=0, output=2, k=5)
    assert [p for _, p in paths] == [[0, 2, 4], [0, 3, 4], [0, 2, 3, 4]]
    assert [w for w, _ in paths] == pytest.approx([0.1875, 0.125, 0.09375], abs=PAPER["atol"])
    assert sum(w for w, _ in paths) == pytest.approx(float(g.context_attribution(2)[0]), abs=PAPER["atol"])


def test_signed_variant_by_hand():
    g = GenerationGraph.from_table(RAW, n_prompt=2, normalize="signed")
    torch.testing.assert_close(g.adjacency[2], torch.tensor([-0.2, 0.4, 0.2, 0.2, 0], dtype=torch.float64))
    # c2 = [-.2, .4] + .2 c0 + .2 c1 with c0 = [.75, .25], c1 = [.875, .125]
    torch.testing.assert_close(g.context_attribution(2), torch.tensor([0.125, 0.475], dtype=torch.float64))
    assert g.adjacency.abs().sum(-1).tolist() == pytest.approx([1, 1, 1])


def test_none_normalisation_keeps_table():
    g = GenerationGraph.from_table(RAW, n_prompt=2, normalize="none")
    torch.testing.assert_close(g.adjacency, RAW)


def _random_table(Y=6, P=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(Y, P + Y, generator=gen, dtype=torch.float64)


def test_mass_conservation_and_neumann_series():
    for normalize in ("paper", "signed"):
        g = GenerationGraph.from_table(_random_table(), n_prompt=4, normalize=normalize)
        A_YY, A_YP = g.A_YY, g.A_YP
        assert torch.equal(A_YY, A_YY.tril(-1))
        series, power = torch.zeros_like(A_YP), torch.eye(6, dtype=torch.float64)
        for _ in range(6):  # A_YY is nilpotent: the series ends after Y terms
            series += power @ A_YP
            power = power @ A_YY
        # triangular solve vs explicit series in float64: round-off only
        torch.testing.assert_close(g.context_matrix(), series, atol=1e-12, rtol=0)
        torch.testing.assert_close(g.context_attribution([1, 3]), series[[1, 3]].sum(0), atol=1e-12, rtol=0)
        if normalize == "paper" and not g.empty_rows:
            # each row loses 1e-8 / Σ_row of its unit mass to the paper's guard; random rows have Σ ≥ 0.01
            torch.testing.assert_close(g.context_matrix().sum(-1), torch.ones(6, dtype=torch.float64), atol=1e-6, rtol=0)


def test_entries_at_or_after_the_row_are_ignored():
    table = _random_table()
    noisy = table.clone()
    noisy[0, 4:] = 5.0  # g0 explaining itself or later tokens: undefined, dropped
    a = GenerationGraph.from_table(table, 4).context_attribution()
    b = GenerationGraph.from_table(noisy, 4).context_attribution()
    torch.testing.assert_close(a, b)


def test_row_without_positive_mass_is_reported_not_nan():
    table = RAW.clone()
    table[1] = torch.tensor([-1.0, -2.0, 0.0, 0.0, 0.0])
    g = GenerationGraph.from_table(table, n_prompt=2, normalize="paper")
    assert g.empty_rows == [1]
    assert torch.isfinite(g.context_matrix()).all()
    assert g.context_attribution(1).abs().sum() == 0
    assert "rows with no positive mass" in repr(g)
    zero = torch.zeros(3, 5, dtype=torch.float64)
    gs = GenerationGraph.from_table(zero, 2, normalize="signed")
    assert gs.empty_rows == [0, 1, 2] and torch.isfinite(gs.adjacency).all()


def test_bad_tables():
    with pytest.raises(InputError, match="empty"):
        GenerationGraph.from_table(torch.zeros(0, 2), 2)
    with pytest.raises(InputError, match="columns"):
        GenerationGraph.from_table(torch.zeros(3, 4), 2)
    with pytest.raises(InputError, match="NaN"):
        GenerationGraph.from_table(torch.full((3, 5), float("nan")), 2)
    with pytest.raises(InputError, match="normalize"):
        GenerationGraph.from_table(RAW, 2, normalize="softmax")
    with pytest.raises(InputError, match="generated node"):
        GenerationGraph.from_table(RAW, 2).context_attribution(7)


def test_exports():
    g = GenerationGraph.from_table(RAW, n_prompt=2, labels=["a", "b", "x", "y", "z"])
    dag = g.to_networkx()
    assert nx.is_directed_acyclic_graph(dag)
    assert all(u < v and v >= 2 for u, v in dag.edges)
    assert dag.nodes[3]["label"] == "y" and dag.nodes[0]["kind"] == "prompt"
    assert dag.edges[0, 2]["weight"] == pytest.approx(0.75, abs=PAPER["atol"])
    data = json.loads(g.to_json())
    assert data["context_attribution"] == pytest.approx([2.03125, 0.96875], abs=PAPER["atol"])
    assert "GenerationGraph" in repr(g) and "<table>" in g._repr_html_()


# ---------------------------------------------------------------------------- exact fast tables
@pytest.mark.parametrize("kind", ["gpt2", "llama"])
@pytest.mark.parametrize("rules", ["attnlrp", "cplrp", "gxi"])
@pytest.mark.parametrize("chunk_size", [1, 3, 16])
def test_batched_table_equals_naive_loop(kind, rules, chunk_size):
    model = tiny(kind)
    prompt = model.to_tokens(PROMPT)
    tokens = torch.cat([prompt, torch.tensor([[5, 9, 12, 4, 7]])], dim=1)
    method = methods.METHODS[{"gxi": "input_x_gradient"}.get(rules, rules)]
    fast = method(model, tokens, prompt.shape[1], chunk_size=chunk_size)
    naive = methods.naive_table(model, tokens, prompt.shape[1], rules)
    arch = adapt(model).arch
    # HF Llama (under a TransformerBridge) computes rotary cos/sin in float32 even for a float64 model;
    # float32 cos differs by an ulp between sequence lengths (SIMD vs scalar tail), so the per-step
    # loop itself moves by ~1e-7 when its prefix length changes. Everywhere else: float64 round-off.
    tol = 1e-6 if arch.is_bridge and arch.positional == "rotary" else 1e-8
    assert (fast - naive).abs().max() < tol
    assert fast.abs().sum() > 0


def test_per_row_backward_fallback_gives_the_same_table(monkeypatch):
    """A backward without batching rules for some op falls back to one backward per row."""
    model = tiny("gpt2")
    prompt = model.to_tokens(PROMPT)
    tokens = torch.cat([prompt, torch.tensor([[5, 9, 12, 4]])], dim=1)
    batched = methods.attnlrp(model, tokens, prompt.shape[1])
    real_grad = torch.autograd.grad
    calls = {"batched": 0, "single": 0}

    def no_vmap(*args, is_grads_batched=False, **kwargs):
        calls["batched" if is_grads_batched else "single"] += 1
        if is_grads_batched:
            raise RuntimeError("vmap: no batching rule for this op")
        return real_grad(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", no_vmap)
    looped = methods.attnlrp(model, tokens, prompt.shape[1])
    assert calls == {"batched": 1, "single": 4}
    torch.testing.assert_close(looped, batched, rtol=1e-10, atol=1e-12)  # float64, summation order only


# ---------------------------------------------------------------------------- cage() end to end
def test_cage_teacher_forced_token_level():
    model = tiny()
    g = cage(model, PROMPT, completion=" john gave the drink")
    prompt = model.to_tokens(PROMPT)[0]
    assert g.n_prompt == len(prompt) and g.n_generated == 4
    assert g.labels[: g.n_prompt] == [str(s) for s in model.to_str_tokens(prompt)]
    assert torch.equal(g.tokens[0, : g.n_prompt], prompt.cpu())
    assert g.context_attribution().shape == (g.n_prompt,)
    # mass conservation: 4 outputs, each a unit of mass, less the paper's 1e-8 / Σ_row per row (the rows
    # of this table have Σ ≥ 0.1, so the deficit stays below 1e-6)
    assert g.context_attribution().sum() == pytest.approx(4.0, abs=1e-6)
    # non-negative paper edges: paths through generated tokens only add mass
    assert (g.context_attribution() >= g.row_attribution() - 1e-12).all()


def test_cage_greedy_matches_generation():
    model = tiny()
    g = cage(model, PROMPT, max_new_tokens=3, method="attention")
    tokens = model.to_tokens(PROMPT)
    for _ in range(3):
        tokens = torch.cat([tokens, model(tokens)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(g.tokens, tokens.cpu())


def test_cage_sentence_and_explicit_spans():
    model = tiny()
    g = cage(model, PROMPT, completion=" mary went . john sat .", granularity="sentence")
    assert g.spans[:2] == [(0, 8), (8, 14)] and g.n_prompt == 2 and g.n_generated == 2
    # explicit prompt spans; generated tokens stay single nodes
    g2 = cage(model, PROMPT, completion=" mary went", granularity=[(0, 4), (4, 14)])
    assert g2.n_prompt == 2 and g2.n_generated == 2
    # the block sums equal sums of the token table
    tok = g.token_table
    assert g.table[1, 0] == pytest.approx(float(tok[3:, 0:8].sum()))
    assert g.table[1, 2] == pytest.approx(float(tok[3:, 14:17].sum()))
    occ = cage(model, PROMPT, completion=" mary went . john sat .", granularity="sentence", method="occlusion")
    assert occ.n_prompt == 2 and torch.isfinite(occ.adjacency).all()


def test_cage_user_callable_method():
    def uniform(model, tokens, n_prompt, **_):
        Y, T = tokens.shape[1] - n_prompt, tokens.shape[1]
        return torch.ones(Y, T).tril(n_prompt - 1)

    g = cage(tiny(), "the cat sat", completion=" on the", method=uniform)
    assert g.method == "uniform"
    P = g.n_prompt  # row 0 = 1/P on each prompt token; row 1 = 1/(P+1) on prompt + g0
    expected = torch.full((P,), 1 / P) + torch.full((P,), 1 / (P + 1)) * (1 + 1 / P)
    torch.testing.assert_close(g.context_attribution(), expected.double(), **PAPER)


def test_cage_bad_inputs():
    model = tiny()
    with pytest.raises(InputError, match="empty"):
        cage(model, PROMPT, completion="")
    with pytest.raises(InputError, match="empty continuation|positive int"):
        cage(model, PROMPT, max_new_tokens=0)
    with pytest.raises(InputError, match="completion= .* or max_new_tokens="):
        cage(model, PROMPT)
    with pytest.raises(InputError, match="tile"):
        cage(model, PROMPT, completion=" mary", granularity=[(0, 3), (4, 15)])
    with pytest.raises(InputError, match="tile"):
        cage(model, PROMPT, completion=" mary", granularity=[(0, 3), (2, 15)])
    with pytest.raises(InputError, match="boundary"):
        cage(model, PROMPT, completion=" mary went", granularity=[(0, 5), (5, 15), (15, 16)])
    with pytest.raises(CageLensError, match="unknown attribution method 'lime'"):
        cage(model, PROMPT, completion=" mary", method="lime")
    with pytest.raises(InputError, match="granularity"):
        cage(model, PROMPT, completion=" mary", granularity="paragraph")


def test_cage_refuses_an_option_its_method_does_not_take():
    """A misspelt or foreign option is refused before anything runs, naming the method's options;
    a callable that takes ``**options`` receives every option."""
    model = tiny()
    with pytest.raises(InputError, match=r"^method 'attnlrp' has no option 'chunk_sise'; its options: chunk_size, long_context$"):
        cage(model, PROMPT, completion=" mary", chunk_sise=2)
    with pytest.raises(InputError, match=r"method 'attention' has no option 'steps'; its options: none"):
        cage(model, PROMPT, completion=" mary", method="attention", steps=4)
    with pytest.raises(InputError, match=r"method 'occlusion' has no option 'long_context'; its options: spans, baseline, chunk_size"):
        cage(model, PROMPT, completion=" mary", method="occlusion", long_context=True)
    seen = {}

    def uniform(model, tokens, n_prompt, **options):
        seen.update(options)
        return torch.ones(tokens.shape[1] - n_prompt, tokens.shape[1]).tril(n_prompt - 1)

    cage(model, PROMPT, completion=" mary", method=uniform, flavour="any")
    assert seen == {"flavour": "any"}


def test_cage_reports_rows_without_positive_mass():
    def negative(model, tokens, n_prompt, **_):
        table = torch.ones(tokens.shape[1] - n_prompt, tokens.shape[1])
        table[0] = -1
        return table

    g = cage(tiny(), PROMPT, completion=" mary went", method=negative)
    assert g.empty_rows == [0] and torch.isfinite(g.context_attribution()).all()


# ---------------------------------------------------------------------------- ground truth (zoo)
def test_cage_recovers_pointer_chase_sources_better_than_rows():
    """The only ground-truth check of CAGE: it must run (a zoo model that fails to load fails the test)."""
    from cage_lens import zoo
    from cage_lens.metrics import auroc

    model, task = zoo.load("pointer-chase"), zoo.task("pointer-chase")
    cage_wins, row_wins, cage_auc, row_auc = 0, 0, [], []
    for sample in task.sample(12, seed=1234):
        g = cage(model, sample.prompt, completion=sample.completion, method="attnlrp")
        last = g.n_generated - 1
        truth, candidates = sorted(sample.total_sources[last]), range(1, g.n_prompt)  # BOS excluded
        c = auroc(g.context_attribution(last), truth, candidates)
        r = auroc(g.row_attribution(last), truth, candidates)
        cage_auc.append(c)
        row_auc.append(r)
        cage_wins += c > r
        row_wins += r > c
    assert sum(cage_auc) / len(cage_auc) > sum(row_auc) / len(row_auc)
    assert cage_wins > row_wins


# ---------------------------------------------------------------------------- the table's plan: rows at once, pass
@pytest.fixture
def small_chunks(monkeypatch):
    """Every attention of the long-context pass deferred and computed in row chunks of a few rows."""
    from cage_lens.core import recompute

    monkeypatch.setattr(recompute, "ATTENTION_BUDGET", 4096)
    monkeypatch.setattr(recompute, "EAGER_MULTIPLE", 0)


def _forced_plan(monkeypatch, long_context: bool, rows: int) -> dict:
    """Make the table's planner answer ``(long_context, rows)``; count the vectorised backwards."""
    from cage_lens import planning

    real = planning.plan_cage_table

    def forced(*args, **kwargs):
        est = real(*args, **{**kwargs, "long_context": long_context})
        est.long_context, est.rows = long_context, rows
        return est

    monkeypatch.setattr(methods, "plan_cage_table", forced)
    calls = {"batched": 0, "batched and refused": 0}
    real_grad = torch.autograd.grad

    def counted(*args, is_grads_batched=False, **kwargs):
        if not is_grads_batched:
            return real_grad(*args, **kwargs)
        calls["batched"] += 1
        try:
            return real_grad(*args, is_grads_batched=True, **kwargs)
        except RuntimeError:   # the table then falls back to one backward per row
            calls["batched and refused"] += 1
            raise

    monkeypatch.setattr(torch.autograd, "grad", counted)
    return calls


@pytest.mark.parametrize("kind", ["gpt2", "qwen3"])
@pytest.mark.parametrize("rules", ["attnlrp", "cplrp"])
def test_long_context_table_equals_the_default_table_with_one_vectorised_backward_per_chunk(
        monkeypatch, small_chunks, kind, rules):
    model = random_model(kind, n_layers=2, dtype=torch.float64)
    prompt = model.to_tokens(PROMPT)
    tokens = torch.cat([prompt, torch.tensor([[5, 9, 12, 4, 7]])], dim=1)
    default = methods.METHODS[rules](model, tokens, prompt.shape[1], long_context=False)
    calls = _forced_plan(monkeypatch, long_context=True, rows=2)
    long = methods.METHODS[rules](model, tokens, prompt.shape[1])
    # 3 chunks of at most 2 rows, each one vectorised backward through the row-chunked attention
    assert calls == {"batched": 3, "batched and refused": 0}
    arch = adapt(model).arch
    tol = 1e-6 if arch.is_bridge and arch.positional == "rotary" else 1e-10   # as the naive-loop test above
    assert (long - default).abs().max() <= tol * default.abs().max()


def test_cage_records_the_plan_and_refuses_a_table_that_fits_neither_way(monkeypatch):
    from cage_lens.errors import InsufficientMemoryError

    model = tiny("gpt2")
    g = cage(model, PROMPT, completion=torch.tensor([5, 9, 12, 4, 7]))
    assert (g.meta["settings"]["long_context"], g.meta["settings"]["rows_at_once"]) == (False, 5)
    monkeypatch.setenv("CAGE_LENS_MAX_MEMORY", "1K")
    with pytest.raises(InsufficientMemoryError, match=r"cage on \d+ tokens .* long_context=True to run anyway"):
        cage(model, PROMPT, completion=torch.tensor([5, 9, 12, 4, 7]))
    forced = cage(model, PROMPT, completion=torch.tensor([5, 9, 12, 4, 7]), long_context=True)
    assert forced.meta["settings"]["long_context"] is True and forced.meta["settings"]["rows_at_once"] == 1
    torch.testing.assert_close(forced.token_table, g.token_table, rtol=1e-9, atol=1e-12)  # float64, summation order


def test_the_planner_keeps_the_default_pass_when_it_fits_else_takes_the_fastest_that_fits():
    """Qwen3-0.6B's configuration in bfloat16, a 2,048-token prompt and 8 generated tokens: with memory for
    it, the default pass with 8 rows at once; with less, the fastest (pass, rows) plan that fits; never a
    plan that does not fit."""
    from cage_lens import planning
    from test_estimate import QWEN3_0_6B

    config = {**QWEN3_0_6B, "torch_dtype": "bfloat16"}

    def est(available, **kw):
        return planning.estimate(config, 2048, "cage", new_tokens=8, available_bytes=available, **kw)

    plans = {(lc, r): est(1e15, long_context=lc, rows=r) for lc in (False, True) for r in (8, 4, 2, 1)}
    assert all(e.rows == r for (lc, r), e in plans.items())
    assert plans[True, 8].peak_bytes < plans[False, 8].peak_bytes / 10   # the long-context rows hold no patterns
    # fewer rows at once are slower in the default pass; at 16 heads the long-context pass is the faster one on
    # the CPU (measured 0.61-0.68 of the default table: benchmarks/results/calibrate_cage_time.md), fastest with
    # all 8 rows (its causal chunks' sums, which grow with the rows at once, are small at 2,048 tokens:
    # docs/estimate.md#time-model)
    assert [plans[False, r].time_forwards for r in (8, 4, 2, 1)] == sorted(plans[False, r].time_forwards for r in (8, 4, 2, 1))
    assert plans[True, 8].time_forwards < plans[False, 8].time_forwards
    assert min(plans, key=lambda k: plans[k].time_forwards) == (True, 8)

    def chosen(available):
        e = est(available)
        assert e.fits
        return e.long_context, e.rows

    assert chosen(1.25 * plans[False, 8].peak_bytes) == (False, 8)     # the default pass whenever it fits whole
    assert chosen(1.25 * plans[False, 4].peak_bytes) == (True, 8)      # else the fastest that fits
    assert chosen(1.25 * plans[True, 8].peak_bytes) == (True, 8)
    assert chosen(1.25 * plans[True, 4].peak_bytes) == (True, 4)
    assert chosen(1.25 * plans[True, 2].peak_bytes) == (True, 2)
    assert chosen(1.25 * plans[True, 1].peak_bytes) == (True, 1)
    assert not est(0.5 * plans[True, 1].peak_bytes).fits
