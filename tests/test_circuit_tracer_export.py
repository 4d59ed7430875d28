"""CircuitGraph.to_circuit_tracer: validated by circuit-tracer 0.5.0's own pydantic models, unique ids,
and exact values on a hand-built graph.

circuit-tracer pins transformers ≤ 4.57.3, so it cannot live in the TL 4 environment: the validation
runs in a subprocess with the Python named by ``CAGE_LENS_CIRCUIT_TRACER_PYTHON`` (CI builds a small
venv with ``pydantic`` and ``circuit-tracer==0.5.0 --no-deps``; the schema module needs nothing else).
When that variable is set (or ``CAGE_LENS_REQUIRE_CIRCUIT_TRACER=1``) a missing or broken
circuit-tracer fails the test; otherwise, where circuit-tracer is not importable, it skips and says why.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from collections import Counter
from fractions import Fraction

import pytest

from cage_lens.circuit.builder import circuit_graph
from cage_lens.errors import InputError
from cage_lens.circuit.export import circuit_tracer_dict
from conftest import cached_model
from test_pruning import twelve_node_graph

PROMPT = "the cat sat on the mat and john"

VALIDATOR = r"""
import json, sys
from importlib.metadata import version
from pathlib import Path
from circuit_tracer.frontend.graph_models import Link, Metadata, Model
out = {"version": version("circuit-tracer"), "graphs": []}
for directory in sys.argv[1:]:
    index = json.loads((Path(directory) / "graph-metadata.json").read_text())
    for meta in index["graphs"]:
        Metadata.model_validate(meta, strict=True)
        doc = json.loads((Path(directory) / f"{meta['slug']}.json").read_text())
        model = Model.model_validate(doc, strict=True)
        for link in doc["links"]:
            Link.model_validate(link, strict=True)
        dumped = model.model_dump()
        out["graphs"].append({"slug": meta["slug"], "nodes": len(model.nodes), "links": len(model.links),
                              "nodes_unchanged": dumped["nodes"] == doc["nodes"],
                              "metadata_unchanged": all(dumped["metadata"][k] == v for k, v in doc["metadata"].items() if k in dumped["metadata"])})
print(json.dumps(out))
"""


def circuit_tracer_python() -> str:
    """The Python that validates: ``CAGE_LENS_CIRCUIT_TRACER_PYTHON``, else this one if circuit-tracer
    imports here; skips (or fails when required) otherwise."""
    configured = os.environ.get("CAGE_LENS_CIRCUIT_TRACER_PYTHON")
    if configured:
        return configured
    if importlib.util.find_spec("circuit_tracer") is not None:
        return sys.executable
    reason = ("circuit-tracer 0.5.0 is not installed in this environment and CAGE_LENS_CIRCUIT_TRACER_PYTHON "
              "is not set (make a venv with `pip install pydantic` and `pip install --no-deps "
              "circuit-tracer==0.5.0` and point the variable at its python)")
    if os.environ.get("CAGE_LENS_REQUIRE_CIRCUIT_TRACER") == "1":
        pytest.fail(reason + "; CAGE_LENS_REQUIRE_CIRCUIT_TRACER=1 requires it")
    pytest.skip(reason)


def validate(*directories) -> dict:
    python = circuit_tracer_python()
    try:
        run = subprocess.run([python, "-c", VALIDATOR, *map(str, directories)], capture_output=True, text=True, timeout=120)
    except OSError as exc:
        pytest.fail(f"the circuit-tracer python {python!r} cannot run: {exc}")
    assert run.returncode == 0, f"circuit-tracer validation failed with {python}:\n{run.stderr[-3000:]}"
    return json.loads(run.stdout)


# ---------------------------------------------------------------------------- circuit-tracer's models
def test_exports_validate_with_circuit_tracer_models(tmp_path):
    model = cached_model("gpt2")
    graphs = {levels: circuit_graph(model, PROMPT, " mary", levels=levels) for levels in ("block", "half", "heads", "neurons")}
    graphs["influence"] = graphs["half"].prune(influence=True)
    for slug, graph in graphs.items():
        graph.to_circuit_tracer(tmp_path, slug=slug, token_prob=0.25 if slug == "half" else None)
    twelve_node_graph().to_circuit_tracer(tmp_path / "hand", slug="hand")
    report = validate(tmp_path, tmp_path / "hand")
    assert report["version"] == "0.5.0"
    by_slug = {g["slug"]: g for g in report["graphs"]}
    assert sorted(by_slug) == sorted([*graphs, "hand"])
    for slug, graph in graphs.items():
        document = json.loads((tmp_path / f"{slug}.json").read_text())
        assert by_slug[slug]["nodes"] == len(document["nodes"]) and by_slug[slug]["links"] == len(document["links"])
        assert by_slug[slug]["nodes_unchanged"] and by_slug[slug]["metadata_unchanged"]
        # every node of the graph plus every input token and the logit node
        n_alive = sum(int(a.sum()) for name, a in graph.alive.items() if name != "embeddings")
        assert len(document["nodes"]) == n_alive + graph.n_pos + 1


# ---------------------------------------------------------------------------- our mapping
@pytest.mark.parametrize("levels", ["half", "heads", "neurons"])
def test_ids_are_unique_and_links_carry_the_graph_edges(levels):
    graph = circuit_graph(cached_model("gpt2"), PROMPT, " mary", levels=levels, top_p=0.95)
    document = circuit_tracer_dict(graph)
    nodes = document["nodes"]
    for field in ("node_id", "jsNodeId"):
        counts = Counter(n[field] for n in nodes)
        assert max(counts.values()) == 1, counts.most_common(3)
    assert len({(n["layer"], n["feature"], n["ctx_idx"]) for n in nodes}) == len(nodes)  # the viewer's featureId
    by_id = {n["node_id"]: n for n in nodes}
    assert all(link["source"] in by_id and link["target"] in by_id for link in document["links"])
    logits = [n for n in nodes if n["feature_type"] == "logit"]
    assert len(logits) == 1 and logits[0]["is_target_logit"] and logits[0]["feature"] == graph.meta["settings"]["target_ids"][0]
    rows = document["metadata"]["cage_lens"]["rows"]
    # links == the graph's edges, value for value, plus target → logit with the target node's relevance
    key_of = {}
    for n in nodes:
        if n["feature_type"] != "logit":
            name = rows[n["layer"]]
            key_of[n["node_id"]] = (name, n["ctx_idx"]) if n["feature_type"] in ("embedding", "residual stream") else (name, n["feature"], n["ctx_idx"])
    exported = Counter((key_of[l["source"]], key_of[l["target"]], l["weight"]) for l in document["links"] if l["target"] in key_of)
    expected = Counter((s, t, d["weight"]) for s, t, d in graph.to_networkx().edges(data=True))
    assert exported == expected
    to_logit = [l for l in document["links"] if l["target"] == logits[0]["node_id"]]
    assert len(to_logit) == 1 and key_of[to_logit[0]["source"]] == graph.target_node
    assert to_logit[0]["weight"] == graph.target_value_at_target
    # activation = the node's relevance
    relevance = dict(graph.node_list())
    assert all(n["activation"] == relevance[key_of[n["node_id"]]] for n in nodes if n["node_id"] in key_of and key_of[n["node_id"]] in relevance)


def test_hand_built_graph_exports_exact_ids_and_influences(tmp_path):
    graph = twelve_node_graph()
    path = graph.to_circuit_tracer(tmp_path, slug="twelve")
    document = json.loads(path.read_text())
    got = {n["node_id"]: n["influence"] for n in document["nodes"]}
    frac = lambda x: float(Fraction(x))  # noqa: E731
    # influence (target node: 1) 1, 1/3, 1/3, 1/4 ×3, 1/6, 1/12 of a total 32/12; cumulative shares,
    # ties in node order: e0 before a3 before b0
    assert got == pytest.approx({
        "E_0_0": frac("23/32"), "E_1_1": frac("31/32"), "0_0_0": 1.0, "0_0_1": frac("16/32"),
        "0_1_0": frac("20/32"), "0_1_1": frac("26/32"), "1_0_1": frac("29/32"), "2_0_1": frac("12/32"),
        "3_0_1": None,
    }, abs=1e-15)
    links = {(l["source"], l["target"]): l["weight"] for l in document["links"]}
    assert links == {("E_0_0", "0_0_0"): 10.0, ("E_0_0", "0_0_1"): 10.0, ("E_1_1", "0_0_1"): 10.0,
                     ("0_0_0", "1_0_1"): 10.0, ("0_0_1", "1_0_1"): 10.0, ("0_1_0", "1_0_1"): 10.0,
                     ("0_0_1", "2_0_1"): 10.0, ("0_1_0", "2_0_1"): 10.0, ("0_1_1", "2_0_1"): 10.0,
                     ("1_0_1", "2_0_1"): 10.0, ("2_0_1", "3_0_1"): 1.0}
    logit = document["nodes"][-1]
    assert logit["clerp"] == 'Output "hand" (p=n/a)' and logit["token_prob"] == 0.0
    index = json.loads((tmp_path / "graph-metadata.json").read_text())
    assert index == {"graphs": [document["metadata"]]}


def test_tokens_are_shown_the_way_the_frontend_expects():
    graph = twelve_node_graph()
    graph.str_tokens = ['say "hi"\n', "\tx\r"]
    graph.target_description = "logit(' \"q\"')"
    document = circuit_tracer_dict(graph, token_prob=0.5)
    assert document["metadata"]["prompt_tokens"] == ['say "hi"⏎', "→x↵"]
    clerps = {n["node_id"]: n["clerp"] for n in document["nodes"]}
    assert clerps["0_1_0"] == "a H1 \"say 'hi'⏎\""
    # the frontend reads the token between the first two double quotes and p after "(p="
    assert clerps["3_0_1"] == "Output \"logit(' 'q'')\" (p=0.500)"


def test_slugs_and_the_graph_index(tmp_path):
    graph = twelve_node_graph()
    with pytest.raises(InputError, match="slug"):
        graph.to_circuit_tracer(tmp_path, slug="../evil")
    with pytest.raises(InputError, match="token_prob"):
        graph.to_circuit_tracer(tmp_path, token_prob=2.0)
    graph.to_circuit_tracer(tmp_path, slug="one")
    graph.to_circuit_tracer(tmp_path, slug="two")
    graph.to_circuit_tracer(tmp_path, slug="one")
    index = json.loads((tmp_path / "graph-metadata.json").read_text())
    assert [g["slug"] for g in index["graphs"]] == ["two", "one"]
    one = (tmp_path / "one.json").read_text()
    for slug in ("graph-metadata", "Graph-Metadata"):  # the index's own name (case-folding file systems too)
        with pytest.raises(InputError, match="would overwrite the folder's index graph-metadata.json"):
            graph.to_circuit_tracer(tmp_path, slug=slug)
    assert json.loads((tmp_path / "graph-metadata.json").read_text()) == index  # untouched
    for bad in ("[1, 2]", '{"graphs": [1]}', '{"graphs": [{"name": "x"}]}'):
        (tmp_path / "graph-metadata.json").write_text(bad)
        with pytest.raises(InputError, match="not a circuit-tracer graph index"):
            graph.to_circuit_tracer(tmp_path, slug="three")
        with pytest.raises(InputError, match="not a circuit-tracer graph index"):
            graph.to_circuit_tracer(tmp_path, slug="one")
        assert (tmp_path / "graph-metadata.json").read_text() == bad
    # nothing was written before the names were checked: no new graph, the old one unchanged
    assert not (tmp_path / "three.json").exists() and (tmp_path / "one.json").read_text() == one
    assert sorted(p.name for p in tmp_path.iterdir()) == ["graph-metadata.json", "one.json", "two.json"]
    with pytest.raises(InputError, match="is not a folder"):
        graph.to_circuit_tracer(tmp_path / "one.json", slug="four")
