"""Every model family on the installed TL line: the coverage table of docs/architectures.md, tested.

Per family (a random tiny model, 2 layers, float64): forward values bit-identical under the rules;
the completeness certificate passes; CP-LRP conserves relevance exactly without biases; the
closed-form graph equals batch-packed autograd (or refuses by name, and autograd works); the CAGE
table equals the naive per-step loop. ``scripts/coverage.py`` runs the same checks and writes
``benchmarks/results/coverage.md``. LXT agreement is in ``test_lxt_agreement.py``.
"""

from __future__ import annotations

import functools

import pytest
import torch

import cage_lens
from cage_lens import methods
from cage_lens.core.adapter import adapt
from cage_lens.core.certificate import certify
from cage_lens.circuit.builder import circuit_graph
from cage_lens.errors import UnsupportedModelError
from cage_lens.loading import has_hooked_transformer
from cage_lens.testing import random_model, supported_families
from conftest import float32_inside

BRIDGE = not has_hooked_transformer()
PROMPT = "the cat sat on the mat and john"
ALL = dict(node_threshold=None, top_p=None)
#: families whose closed form refuses on this line, and why (tested: the refusal names the reason)
FAST_REFUSALS = {"gptj": "rotated queries and keys"} if BRIDGE else {}



@functools.lru_cache(maxsize=None)
def family_model(family: str, biases: bool = True):
    return random_model(family, biases=biases)


FAMILIES = supported_families()


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_values_are_bit_identical_under_every_rule_set(family):
    model = family_model(family)
    tokens = model.to_tokens(PROMPT)
    plain = model(tokens)
    for rules in ("attnlrp", "cplrp", cage_lens.RuleSet("uniform", q=1, k=1, v=1, gate=0.5, up=0.5)):
        with cage_lens.lrp(model, rules):
            assert torch.equal(model(tokens), plain), rules


@pytest.mark.parametrize("family", FAMILIES)
def test_certificate_passes_to_float64_precision(family):
    cert = certify(adapt(family_model(family)))
    assert cert.passed, cert.reason
    assert cert.max_error <= 1e-12, cert.errors


@pytest.mark.parametrize("family", FAMILIES)
def test_cplrp_conserves_exactly_without_biases(family):
    a = cage_lens.attribute(family_model(family, biases=False), PROMPT, target=7, rules="cplrp")
    assert a.conservation.max_error() < 1e-12
    assert float(a.token_relevance.abs().max()) > 1e-3  # not a trivially-zero comparison


def _graph_error(fast, ref) -> float:
    worst = 0.0
    for es in fast.edge_sets:
        a, b = fast.edge_matrix(es.source, es.target), ref.edge_matrix(es.source, es.target)
        scale = max(float(b.abs().max()), float(fast.node_relevance(es.source).abs().max()), 1e-30)
        worst = max(worst, float((a - b).abs().max()) / scale)
    return worst


@pytest.mark.parametrize("family", FAMILIES)
def test_closed_form_graph_equals_autograd_or_refuses_by_name(family):
    model = family_model(family)
    for rules in ("attnlrp", "cplrp"):
        options = dict(rules=rules, levels="half", **ALL)
        ref = circuit_graph(model, PROMPT, " mary", method="autograd", batch_size=64, **options)
        # the chain rule: the edges leaving a node sum to its relevance (the reference stands on its own)
        outgoing: dict = {}
        for es in ref.edge_sets:
            outgoing[es.source] = outgoing.get(es.source, 0) + ref.edge_matrix(es.source, es.target).sum(0)
        for level, total in outgoing.items():
            relevance = ref.node_relevance(level)
            assert float((total - relevance).abs().max()) <= 1e-5 * float(relevance.abs().max()), level
        if family in FAST_REFUSALS:
            with pytest.raises(UnsupportedModelError, match=FAST_REFUSALS[family] + ".*use method='autograd'"):
                circuit_graph(model, PROMPT, " mary", **options)
            continue
        fast = circuit_graph(model, PROMPT, " mary", **options)
        assert fast.levels == ref.levels
        # float32 inside HF modules (eager softmax, RMSNorm): the autograd reference is float32-rounded
        assert _graph_error(fast, ref) < (1e-5 if float32_inside(model) else 1e-12), rules


@pytest.mark.parametrize("family", FAMILIES)
def test_cage_table_equals_the_naive_loop(family):
    model = family_model(family)
    tokens = model.to_tokens(PROMPT)
    n_prompt = tokens.shape[1] - 2
    table = methods.attnlrp(model, tokens, n_prompt)
    naive = methods.naive_table(model, tokens, n_prompt, "attnlrp")
    tolerance = 1e-5 if float32_inside(model) else 1e-10  # float32 inside HF modules: see conftest
    assert torch.allclose(table, naive, rtol=tolerance, atol=tolerance * float(naive.abs().max()))
    graph = cage_lens.cage(model, tokens[0, :n_prompt], completion=tokens[0, n_prompt:])
    assert torch.allclose(graph.table[:, : tokens.shape[1]], table, atol=1e-12)
