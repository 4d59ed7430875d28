"""save/load round trips compare every field; provenance is filled; bad files are refused clearly."""

from __future__ import annotations

import dataclasses
import json
from importlib.metadata import version

import pytest
import torch

import cage_lens
from cage_lens.core.adapter import adapt
from cage_lens.attribution import Attribution, attribute
from cage_lens.generation.graph import GenerationGraph, cage
from cage_lens.circuit.graph import CircuitGraph
from cage_lens.circuit.builder import circuit_graph
from cage_lens.core.rulesets import ATTNLRP, CPLRP, RuleSet
from cage_lens.errors import InputError
from cage_lens.failure import FailureExplanation, explain_failure
from cage_lens.persist import SCHEMA_VERSION, SavedCallable, read_header
from conftest import cached_model

PROMPT = "the cat sat on the mat and john"


# ---------------------------------------------------------------------------- comparison
def assert_same(a, b, path: str = "result") -> None:
    """Every dataclass field, recursively: tensors bit-equal with the same dtype and shape, containers
    of the same type and order, scalars of the same type and value."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), path
        assert a.dtype == b.dtype and a.shape == b.shape, (path, a.dtype, b.dtype, a.shape, b.shape)
        assert torch.equal(a.cpu(), b), path
    elif dataclasses.is_dataclass(a):
        assert type(a) is type(b), (path, type(a), type(b))
        for f in dataclasses.fields(a):
            if not f.name.startswith("_"):
                assert_same(getattr(a, f.name), getattr(b, f.name), f"{path}.{f.name}")
    elif isinstance(a, dict):
        assert type(b) is dict and list(a) == list(b), (path, list(a), list(b))
        for k in a:
            assert_same(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), (path, type(a), type(b))
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    elif callable(a) and not isinstance(a, type):
        assert isinstance(b, SavedCallable) and b.__name__ == a.__name__, path
    else:
        assert type(a) is type(b) and a == b, (path, a, b)


def round_trip(result, tmp_path, loader):
    path = result.save(tmp_path / "result.safetensors")
    loaded = loader(path)
    assert_same(result, loaded)
    generic = cage_lens.load(path)
    assert_same(result, generic)
    return loaded


# ---------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("kind, neurons, contrast", [("gpt2", 3, " store"), ("llama", "all", None), ("attn_only", None, None)])
def test_attribution_round_trip(tmp_path, kind, neurons, contrast):
    model = cached_model(kind)
    attr = attribute(model, [PROMPT, "the dog ran"], target=" mat", contrast=contrast, neurons=neurons)
    loaded = round_trip(attr, tmp_path, Attribution.load)
    assert loaded.lengths == attr.lengths and loaded.str_tokens == attr.str_tokens
    assert loaded.target == attr.target and loaded.conservation.points == attr.conservation.points
    if neurons is not None:
        assert torch.equal(loaded.neuron_relevance.dense(model.cfg.d_mlp), attr.neuron_relevance.dense(model.cfg.d_mlp))
    assert (attr.position_relevance is None) == (kind == "llama")
    assert list(loaded.node_relevance) == list(attr.node_relevance)  # layer order kept
    assert loaded.layer_trace(1)[0] == attr.layer_trace(1)[0]
    assert torch.equal(loaded.layer_trace(1)[1], attr.layer_trace(1)[1])


def test_callable_target_is_kept_by_name_and_refuses_to_run(tmp_path):
    def margin(logits):
        return logits[:, 3] - logits[:, 4]

    attr = attribute(cached_model("gpt2"), PROMPT, target=margin)
    loaded = round_trip(attr, tmp_path, Attribution.load)
    assert loaded.target_description == attr.target_description == "custom target margin"
    assert loaded.target.mode.qualified_name.endswith("margin")
    with pytest.raises(InputError, match="saved by name only"):
        loaded.target(torch.zeros(1, 8))


@pytest.mark.parametrize("levels", ["half", "heads", "neurons"])
def test_circuit_graph_round_trip(tmp_path, levels):
    graph = circuit_graph(cached_model("gpt2"), PROMPT, " mary", levels=levels, top_p=0.9)
    assert all(es.dense is not None for es in graph.edge_sets)
    loaded = round_trip(graph, tmp_path, CircuitGraph.load)
    for es in graph.edge_sets:
        assert torch.equal(loaded.edge_matrix(es.source, es.target), graph.edge_matrix(es.source, es.target))
    assert loaded.node_list() == graph.node_list()
    assert loaded.top_paths(3) == graph.top_paths(3)
    assert loaded.to_json() == graph.to_json()


def test_circuit_graph_without_dense_matrices_round_trip(tmp_path):
    graph = circuit_graph(cached_model("llama"), PROMPT, " mary", levels="block", dense_limit=2)
    assert all(es.dense is None for es in graph.edge_sets)
    loaded = round_trip(graph, tmp_path, CircuitGraph.load)
    assert loaded.metrics() == graph.metrics()


@pytest.mark.parametrize("granularity", ["token", "sentence"])
def test_generation_graph_round_trip(tmp_path, granularity):
    g = cage(cached_model("gpt2"), PROMPT, completion=" mary went . john sat .", granularity=granularity)
    loaded = round_trip(g, tmp_path, GenerationGraph.load)
    if granularity == "sentence":
        assert all(type(s) is tuple for s in loaded.spans) and loaded.spans == g.spans
    assert torch.equal(loaded.context_attribution(), g.context_attribution())
    assert loaded.labels == g.labels and loaded.empty_rows == g.empty_rows


def test_failure_explanation_round_trip(tmp_path):
    e = explain_failure(cached_model("gpt2"), PROMPT, wrong=" mary", correct=" store")
    loaded = round_trip(e, tmp_path, FailureExplanation.load)
    assert repr(loaded) == repr(e)


# ---------------------------------------------------------------------------- provenance
def test_builders_fill_meta_with_provenance():
    model = cached_model("llama")
    attr = attribute(model, PROMPT, target=" mat", contrast=" store", rules="cplrp")
    graph = circuit_graph(model, PROMPT, " mary", levels="block", top_p=0.7)
    gen = cage(model, PROMPT, completion=" mary went", method="input_x_gradient")
    failure = explain_failure(model, PROMPT, wrong=" mary", correct=" store", levels="block")
    for result in (attr, graph, gen, failure):
        meta = result.meta
        assert meta["versions"]["torch"] == torch.__version__
        assert meta["versions"]["transformer-lens"] == version("transformer-lens")
        assert meta["model"]["architecture"] == dataclasses.asdict(adapt(model).arch)
        assert meta["model"]["name"].endswith("tiny_tokenizer") and meta["model"]["dtype"] == "float64"
        json.dumps(meta)  # JSON-ready
    assert attr.meta["settings"]["rules"] == CPLRP.to_dict() and attr.meta["settings"]["target"] == attr.target_description
    assert graph.meta["settings"]["rules"] == failure.meta["settings"]["rules"] == ATTNLRP.to_dict()
    assert attr.meta["settings"]["contrast_ids"] == attr.contrast_ids
    assert graph.meta["settings"]["top_p"] == 0.7 and graph.meta["settings"]["levels"] == "block"
    assert graph.meta["settings"]["target_ids"] == [model.to_single_token(" mary")]
    assert gen.meta["settings"]["method"] == "input_x_gradient" and gen.meta["settings"]["n_prompt"] == gen.n_prompt
    assert failure.meta["settings"]["correct"] == " store" and failure.meta["settings"]["levels"] == "block"


def test_zoo_models_are_named_in_provenance():
    from cage_lens import zoo

    model = zoo.load("ioi", "tiny")
    attr = attribute(model, "when mary and john went to the store , john gave a drink to")
    assert attr.meta["model"]["zoo"] == {"model": "ioi-tiny", "checkpoint": None}


def test_header_is_readable_without_loading(tmp_path):
    attr = attribute(cached_model("gpt2"), PROMPT, target=" mat")
    path = attr.save(tmp_path / "a.safetensors")
    header = read_header(path)
    assert header["kind"] == "Attribution" and header["schema_version"] == SCHEMA_VERSION
    assert header["provenance"] == attr.meta
    assert header["written_by"]["cage-lens"] == cage_lens.__version__
    from safetensors.torch import load_file

    stored = load_file(str(path))
    assert any(torch.equal(t, attr.token_relevance) and t.dtype == torch.float64 for t in stored.values())


def test_to_json_keeps_neuron_relevance_and_meta():
    attr = attribute(cached_model("gpt2"), [PROMPT, "the dog ran"], target=" mat", neurons=2)
    data = json.loads(attr.to_json())
    n = attr.lengths[1]
    assert data["neuron_relevance"]["top_k"] == 2
    assert data["neuron_relevance"]["values"][1] == attr.neuron_relevance.values[1, :, :n].tolist()
    assert data["neuron_relevance"]["indices"][0] == attr.neuron_relevance.indices[0].tolist()
    assert data["meta"] == attr.meta
    assert json.loads(attribute(cached_model("gpt2"), PROMPT).to_json())["neuron_relevance"] is None


# ---------------------------------------------------------------------------- refusals
def _rewrite_header(path, change):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(path), framework="pt") as f:
        header = json.loads(f.metadata()["cage_lens"])
    change(header)
    save_file(load_file(str(path)), str(path), metadata={"cage_lens": json.dumps(header)})


def test_newer_schema_is_refused(tmp_path):
    path = attribute(cached_model("gpt2"), PROMPT).save(tmp_path / "a.safetensors")
    _rewrite_header(path, lambda h: h.update(schema_version=SCHEMA_VERSION + 1))
    with pytest.raises(InputError, match=f"schema {SCHEMA_VERSION + 1}.*Upgrade cage_lens"):
        cage_lens.load(path)


def test_unknown_field_is_refused(tmp_path):
    path = attribute(cached_model("gpt2"), PROMPT).save(tmp_path / "a.safetensors")
    _rewrite_header(path, lambda h: h["result"]["fields"].update(extra=1))
    with pytest.raises(InputError, match=r"fields \['extra'\]"):
        cage_lens.load(path)


def test_wrong_kind_and_foreign_files_are_refused(tmp_path):
    path = circuit_graph(cached_model("gpt2"), PROMPT, " mary").save(tmp_path / "g.safetensors")
    with pytest.raises(InputError, match="holds a CircuitGraph, not a Attribution.*cage_lens.load"):
        Attribution.load(path)
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(InputError, match="not a cage_lens result"):
        cage_lens.load(tmp_path / "plain.safetensors")
    (tmp_path / "text.safetensors").write_text("hello")
    with pytest.raises(InputError, match="not readable as safetensors"):
        cage_lens.load(tmp_path / "text.safetensors")
    with pytest.raises(FileNotFoundError, match="no result file"):
        cage_lens.load(tmp_path / "missing.safetensors")


def test_values_without_a_stored_form_are_refused(tmp_path):
    attr = attribute(cached_model("gpt2"), PROMPT)
    attr.meta["handle"] = object()
    with pytest.raises(InputError, match=r"Attribution\.meta\.handle: values of type object"):
        attr.save(tmp_path / "a.safetensors")
    assert not list(tmp_path.iterdir())  # nothing half-written


# ---------------------------------------------------------------------------- provenance by value
UNIFORM = RuleSet("uniform1", q=1, k=1, v=1, gate=0.5, up=0.5)


def test_a_custom_rule_set_under_a_built_in_name_is_refused():
    with pytest.raises(InputError, match=r"RuleSet 'attnlrp' is not the built-in 'attnlrp': q=1.0 \(built-in 0.25\).*name of its own"):
        RuleSet("attnlrp", q=1, k=1, v=1)
    with pytest.raises(InputError, match=r"'CPLRP' is not the built-in 'cplrp': q=0.5 \(built-in 0.0\)"):
        dataclasses.replace(CPLRP, name="CPLRP", q=0.5)
    assert RuleSet(**ATTNLRP.to_dict()) == ATTNLRP  # the built-in's own values are the built-in


def test_results_record_and_reload_their_rule_set_by_value(tmp_path):
    model = cached_model("gpt2")
    attr = attribute(model, PROMPT, target=" mat", rules=UNIFORM)
    graph = circuit_graph(model, PROMPT, " mary", rules=UNIFORM, levels="block")
    for result in (attr, graph):
        loaded = cage_lens.load(result.save(tmp_path / f"{type(result).__name__}.safetensors"))
        assert type(loaded.rule_set) is RuleSet and loaded.rule_set == UNIFORM and loaded.rules == "uniform1"
        assert loaded.meta["settings"]["rules"] == UNIFORM.to_dict()
        assert json.loads(result.to_json())["rule_set"] == UNIFORM.to_dict()
    reloaded = Attribution.load(tmp_path / "Attribution.safetensors")
    again = attribute(model, PROMPT, target=" mat", rules=reloaded.rule_set)  # the values reproduce the numbers
    assert torch.equal(again.token_relevance, attr.token_relevance)


def test_a_tampered_rule_set_is_refused_on_load(tmp_path):
    path = attribute(cached_model("gpt2"), PROMPT, target=" mat").save(tmp_path / "a.safetensors")
    _rewrite_header(path, lambda h: h["result"]["fields"]["rule_set"]["fields"].update(q=1.0, k=1.0))
    with pytest.raises(InputError, match=r"RuleSet 'attnlrp' is not the built-in 'attnlrp': q=1.0 \(built-in 0.25\)"):
        cage_lens.load(path)


def _fields(h):
    return h["result"]["fields"]


@pytest.mark.parametrize("change, message", [
    (lambda h: h.update(schema_version="1"), r"schema_version is the str '1', it must be an integer"),
    (lambda h: h.update(schema_version=True), r"schema_version is the bool True, it must be an integer"),
    (lambda h: h.update(schema_version=0), r"schema_version 0 does not exist"),
    (lambda h: h.update(extra=1), r"unknown keys \['extra'\]"),
    (lambda h: h.pop("kind"), r"no 'kind'"),
    (lambda h: h.update(provenance=[]), r"provenance is the list \[\], it must be a JSON object"),
    (lambda h: _fields(h).update(rules={"__dtype__": "load"}), r"result.rules names the dtype 'load', which is not one of"),
    (lambda h: _fields(h).update(rules={"__tensor__": "0:x", "x": 1}), r"result.rules is not a valid __tensor__ entry"),
    (lambda h: _fields(h).update(rules={"__module__": "os"}), r"result.rules has the unknown tag '__module__'"),
    (lambda h: _fields(h).update(rules=123), r"Attribution.rules holds 123, which is not a str"),
    (lambda h: _fields(h).update(positions=[99]), r"row 0 has length 9 and position 99, outside its 9 tokens"),
    (lambda h: _fields(h).update(rules="cplrp"), r"rules 'cplrp' is not the name of its rule set 'attnlrp'"),
    (lambda h: _fields(h).update(target={"__class__": "Path", "fields": {}}), r"names an unknown class 'Path'"),
])
def test_damaged_headers_are_refused_before_any_field_is_used(tmp_path, change, message):
    path = attribute(cached_model("gpt2"), PROMPT, target=" mat").save(tmp_path / "a.safetensors")
    _rewrite_header(path, change)
    with pytest.raises(InputError, match=message) as info:
        cage_lens.load(path)
    assert "\n" not in str(info.value)


def test_schema_1_files_get_their_rule_set_by_value(tmp_path):
    attr = attribute(cached_model("gpt2"), PROMPT, target=" mat", rules=UNIFORM)
    path = attr.save(tmp_path / "a.safetensors")

    def as_schema_1(h, meta_values=True):
        fields = _fields(h)
        stored = fields.pop("rule_set")["fields"]
        fields["meta"]["settings"]["rules"] = stored["name"]
        if meta_values:
            fields["meta"]["rule_set"] = stored  # where schema 1 kept the values
        h["schema_version"] = 1

    _rewrite_header(path, as_schema_1)
    assert Attribution.load(path).rule_set == UNIFORM
    path = attr.save(tmp_path / "b.safetensors")
    _rewrite_header(path, lambda h: as_schema_1(h, meta_values=False))
    with pytest.raises(InputError, match=r"\(schema 1\) names the rule set 'uniform1' without its values"):
        Attribution.load(path)


HOSTILE_TEXT = "\u202eevil\x1b[31m\n"


def _plant(h):
    """Control and bidi characters in every text field a result's repr shows."""
    def walk(value):
        if isinstance(value, dict):
            fields = value.get("fields") if "__class__" in value else None
            if fields is not None:
                for key in ("target_description", "level_mode", "wrong", "correct", "method"):
                    if isinstance(fields.get(key), str):
                        fields[key] = HOSTILE_TEXT + fields[key]
                for key in ("str_tokens", "prompt_tokens", "labels"):
                    tokens = fields.get(key)
                    if isinstance(tokens, list) and tokens:
                        row = tokens[0] if isinstance(tokens[0], list) else tokens
                        row[-1] = HOSTILE_TEXT
            for v in value.values():
                walk(v)
        elif isinstance(value, list):
            for v in value:
                walk(v)
    walk(h["result"])


def test_text_from_a_loaded_file_reaches_reprs_escaped(tmp_path):
    model = cached_model("gpt2")
    results = (attribute(model, PROMPT, target=" mat"), circuit_graph(model, PROMPT, " mary", levels="block"),
               cage(model, PROMPT, completion=" mary went"), explain_failure(model, PROMPT, wrong=" mary", correct=" store"))
    for result in results:
        path = result.save(tmp_path / f"{type(result).__name__}.safetensors")
        _rewrite_header(path, _plant)
        text = repr(cage_lens.load(path))
        assert "\\u202e" in text and "\\x1b" in text, text
        assert "\u202e" not in text and "\x1b" not in text, text
