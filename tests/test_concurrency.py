"""Concurrent use of one model: cage_lens calls in several threads return their serial results, and a
plain forward in another thread during a call is untouched (docs/rules.md#engine)."""

from __future__ import annotations

import threading

import pytest
import torch

import cage_lens
from cage_lens import methods
from cage_lens.circuit.builder import circuit_graph
from conftest import cached_model, hook_count

PROMPTS = ["the cat sat on the mat", "the dog ran to the big red box", "mary went to the store", "one two three four five six"]
THREADS, CALLS = 4, 20


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal up to the dtype's rounding: a forward in another thread may sum in another order (torch's
    intra-op thread count is per thread), ~1e-15 relative in float64. Hooks of one call acting on
    another would change values by far more than this."""
    eps = torch.finfo(b.dtype).eps
    return a.shape == b.shape and bool(torch.allclose(a, b, rtol=64 * eps, atol=64 * eps * float(b.abs().max())))


def test_same_tells_rounding_from_a_real_difference():
    x = torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64)
    assert same(x * (1 + 4e-16), x) and not same(x * (1 + 1e-9), x) and not same(x[:2], x)


def _in_threads(work, n: int = THREADS) -> list:
    """Run ``work(i)`` in ``n`` threads started together, each with the main thread's torch thread
    count (it is per thread); re-raise the first failure."""
    results, errors = [None] * n, []
    start = threading.Barrier(n)
    threads_per_worker = torch.get_num_threads()

    def run(i):
        try:
            torch.set_num_threads(threads_per_worker)
            start.wait()
            results[i] = work(i)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_threads_calling_attribute_get_the_serial_results(kind):
    model = cached_model(kind)
    rules = ["attnlrp", "cplrp", "gxi", "attnlrp"]
    serial = [cage_lens.attribute(model, PROMPTS[i], target=5 + i, rules=rules[i]).token_relevance for i in range(THREADS)]

    def work(i):
        return [cage_lens.attribute(model, PROMPTS[i], target=5 + i, rules=rules[i]).token_relevance for _ in range(CALLS)]

    for i, outputs in enumerate(_in_threads(work)):
        assert all(same(out, serial[i]) for out in outputs), i
    assert hook_count(model) == 0


def test_threads_building_graphs_and_cage_tables_get_the_serial_results():
    model = cached_model("llama")
    tokens = model.to_tokens(PROMPTS[1])
    graph = lambda: circuit_graph(model, PROMPTS[0], 5, node_threshold=None, top_p=None)  # noqa: E731
    table = lambda: methods.attnlrp(model, tokens, tokens.shape[1] - 3)  # noqa: E731
    serial_graph, serial_table = graph(), table()

    def work(i):
        if i % 2:
            return [table() for _ in range(3)]
        return [graph() for _ in range(3)]

    for i, outputs in enumerate(_in_threads(work)):
        for out in outputs:
            if i % 2:
                assert same(out, serial_table)
            else:
                for es in serial_graph.edge_sets:
                    assert same(out.edge_matrix(es.source, es.target), serial_graph.edge_matrix(es.source, es.target))
    assert hook_count(model) == 0


def test_a_foreign_forward_during_a_call_is_untouched():
    model = cached_model("gpt2")
    tokens = model.to_tokens(PROMPTS[1])
    with torch.no_grad():
        expected = model(tokens)
    serial = cage_lens.attribute(model, PROMPTS[0], target=5).token_relevance
    done = threading.Event()

    def work(i):
        if i == 0:  # cage_lens calls (their row selection and rules must not touch thread 1's forward)
            try:
                return [cage_lens.attribute(model, PROMPTS[0], target=5).token_relevance for _ in range(CALLS)]
            finally:
                done.set()
        outputs = []
        while not done.is_set() or not outputs:
            with torch.no_grad():
                outputs.append(model(tokens))
        return outputs

    ours, foreign = _in_threads(work, n=2)
    assert all(same(out, serial) for out in ours)
    assert all(same(out, expected) for out in foreign), len(foreign)


def test_an_lrp_block_in_one_thread_does_not_reach_another():
    model = cached_model("gpt2")
    plain = cage_lens.attribute(model, PROMPTS[0], target=5, rules="gxi").token_relevance
    inside, outside = threading.Event(), threading.Event()

    def work(i):
        if i == 0:
            with cage_lens.lrp(model, "attnlrp"):
                inside.set()
                outside.wait(timeout=60)
            return None
        inside.wait(timeout=60)
        try:  # gxi in this thread while AttnLRP is active in the other one: no conflict, no leak
            return cage_lens.attribute(model, PROMPTS[0], target=5, rules="gxi").token_relevance
        finally:
            outside.set()

    _, result = _in_threads(work, n=2)
    assert same(result, plain)
    assert hook_count(model) == 0
