"""One input gate for every entry point: a registry of ALL public entry points that take model inputs
(text, token ids, numeric settings), each driven through a table of hostile inputs. Every one must
refuse with a one-line ``CageLensError`` naming the problem (a study records it as the row's reason,
its way of refusing one record without stopping the others) and leave no hook behind.

The registry is complete by construction: every public callable — ``cage_lens.__all__``, the ``__all__``
of the public subpackages it names (``methods``, ``metrics``, ``patching``, ``study``, ``zoo``) and every
``cage-lens`` subcommand — must be registered here or listed in ``NOT_INPUTS`` with the reason it takes
no model inputs; a new entry point that is in neither fails :func:`test_every_public_entry_point_is_registered`.
"""

from __future__ import annotations

import argparse
import re
import types
from dataclasses import dataclass, field
from typing import Callable

import pytest
import torch

import cage_lens
from cage_lens import cli, methods, metrics, patching, specs, study, zoo
from cage_lens.errors import CageLensError
from conftest import PROMPT, cached_model, hook_count

NAN, INF = float("nan"), float("inf")
LONG = " ".join(["the cat sat on the mat ."] * 10)  # 70 words + BOS = 71 tokens > n_ctx 64
UNKNOWN = "the cat sat on the zorblax"  # 'zorblax' is not in the tiny word-level vocabulary

#: the hostile inputs, and what every refusal of each must say
CASES = {
    "over_long": r"(71 tokens long|has 65 tokens|has 71 tokens) but the model's context \(n_ctx\) is 64",
    "unknown_word": r"1 word\(s\) the model's vocabulary does not contain: 'zorblax'",
    "float_ids": r"must hold integer ids, got dtype torch.float32",
    "out_of_range_ids": r"token ids must lie in \[0, 96\); got range \[1, 500\]",
    "nan_number": r"(must be|expected) .*got '?nan'?",
    "inf_number": r"(must be|expected) .*got '?inf'?",
    "contrast_is_target": r"same token",
    "batch_for_one": r"one (prompt|sequence) at a time|is a list; expected a string",
    "empty_prompt": r"is empty|has no prompt \(a non-empty string\)",
}
#: each hostile input in the form a text entry point and a token-id entry point receive it
TEXT = {"over_long": LONG, "unknown_word": UNKNOWN, "empty_prompt": "", "batch_for_one": [PROMPT, PROMPT],
        "float_ids": torch.ones((1, 5)), "out_of_range_ids": torch.tensor([[1, 500]])}
IDS = {"over_long": torch.ones((1, 65), dtype=torch.long), "empty_prompt": torch.zeros((1, 0), dtype=torch.long),
       "batch_for_one": torch.ones((2, 6), dtype=torch.long), "float_ids": torch.ones((1, 5)),
       "out_of_range_ids": torch.tensor([[1, 500]])}
GOOD_IDS = torch.tensor([[0, 4, 5, 6, 7, 8]])


def metric(logits):
    return logits[:, -1, 0].sum()


@dataclass
class Entry:
    """How to call one entry point with a hostile input (``call(model, inputs, **numeric)``) and which
    cases do not apply to it (case → why)."""

    call: Callable
    numeric: str | None = None            # the numeric argument that gets NaN / inf
    contrast: Callable | None = None      # a call whose contrast equals its target
    inputs: dict = field(default_factory=lambda: TEXT)
    not_applicable: dict[str, str] = field(default_factory=dict)


NO_NUMBER = "takes no numeric argument (grids, rules and the metric are not numbers)"
NO_CONTRAST = "has no target or contrast: what is measured is the user's metric"
TAKES_BATCH = "takes a [batch, pos] batch (TransformerLens' patching contract)"
IDS_AS_GIVEN = "takes token ids, which are used as they are (the way to explain <unk> deliberately)"


def _patching(fn: Callable, numeric: str | None = None) -> Entry:
    no_number = {} if numeric else {"nan_number": NO_NUMBER, "inf_number": NO_NUMBER}
    return Entry(fn, numeric=numeric, not_applicable={**no_number, "contrast_is_target": NO_CONTRAST,
                                                      "batch_for_one": TAKES_BATCH})


def _grid_function(name: str) -> Entry:
    fn = getattr(patching, name)
    return _patching(lambda m, x, **k: fn(m, x, {}, metric, **k), numeric="speedup")


def _method(name: str) -> Entry:
    fn = getattr(methods, name)
    return Entry(lambda m, x, n_prompt=2: fn(m, x, n_prompt), numeric="n_prompt", inputs=IDS,
                 not_applicable={"unknown_word": IDS_AS_GIVEN, "contrast_is_target": "explains generated tokens, no contrast"})


def _study_run(m, x, **numeric):
    """One record through study.run: a refused record becomes a skipped row whose reason names the
    problem (raised here so the table reads the same); a refused setting raises."""
    import tempfile

    with tempfile.TemporaryDirectory() as out:
        study.run({"m": m}, [{"prompt": x, "answer": " cat"}], f"{out}/s", progress=False, **numeric)
        row = study.load(f"{out}/s").iloc[0]
    if row["status"] == "skipped":
        raise CageLensError(row["reason"])
    return row


class CliError(CageLensError):
    """A CLI command's exit status 2 with its one stderr line."""


def _cli(args: list[str]) -> Callable:
    def run(m, x, **numeric):
        return _run_cli(m, [args[0], x, *args[1:]] + [a for k, v in numeric.items() for a in (f"--{k}", str(v))])
    return run


def _run_cli(model, argv):
    import contextlib
    import io

    err = io.StringIO()
    original = specs.model_from_spec
    specs.model_from_spec = lambda spec: model
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                code = cli.main(argv)
            except SystemExit as exit_:  # argparse usage errors
                code = exit_.code
    finally:
        specs.model_from_spec = original
    text = err.getvalue()
    assert code == 2 and text.count("\n") == 1, (code, text)
    raise CliError(text.strip())


TEXT_ONLY = "takes text only (a command-line argument); ids never reach it"
ONE_PROMPT = "takes exactly one prompt argument"

REGISTRY: dict[str, Entry] = {
    "attribute": Entry(lambda m, x, **k: cage_lens.attribute(m, x, **k), numeric="top_k",
                       contrast=lambda m: cage_lens.attribute(m, PROMPT, target=" cat", contrast=" cat"),
                       not_applicable={"batch_for_one": "explains batches (right-padded)"}),
    "circuit_graph": Entry(lambda m, x, **k: cage_lens.circuit_graph(m, x, **k), numeric="node_threshold",
                           contrast=lambda m: cage_lens.circuit_graph(m, PROMPT, target=" cat", contrast=" cat")),
    "cage": Entry(lambda m, x, max_new_tokens=2: cage_lens.cage(m, x, max_new_tokens=max_new_tokens),
                  numeric="max_new_tokens", not_applicable={"contrast_is_target": "explains a continuation, no contrast"}),
    "explain_failure": Entry(lambda m, x, **k: cage_lens.explain_failure(m, x, wrong=" dog", correct=" cat", **k),
                             numeric="node_threshold",
                             contrast=lambda m: cage_lens.explain_failure(m, PROMPT, wrong=" cat", correct=" cat")),
    "patching.relevance_patch": _patching(lambda m, x, **k: patching.relevance_patch(m, x, {}, metric, "resid_pre", **k),
                                          numeric="speedup"),
    "patching.agreement": _patching(lambda m, x, **k: patching.agreement(
        m, corrupted_tokens=x, clean_tokens=PROMPT, metric=metric, grids=("resid_pre",), **k), numeric="speedup"),
    "patching.activation_patch": _patching(lambda m, x: patching.activation_patch(m, x, {}, metric, "resid_pre")),
    "patching.check_same_length": _patching(lambda m, x: patching.check_same_length(m, x, PROMPT)),
    **{f"patching.{name}": _grid_function(name) for name in patching.__all__ if name.startswith("relevance_patch_")},
    **{f"methods.{name}": _method(name) for name in methods.__all__ if name in methods.METHODS},
    "methods.naive_table": _method("naive_table"),
    "methods.sequence_logprobs": Entry(lambda m, x, n_prompt=2: methods.sequence_logprobs(m, x, n_prompt),
                                       numeric="n_prompt", inputs=IDS,
                                       not_applicable={"unknown_word": IDS_AS_GIVEN, "contrast_is_target": "no contrast",
                                                       "batch_for_one": "scores a batch of sequences"}),
    "metrics.deletion_logprobs": Entry(lambda m, x, n_prompt=2: metrics.deletion_logprobs(m, x, n_prompt, [(0, 1), (1, 2)], [1.0, 0.5]),
                                       numeric="n_prompt", inputs=IDS,
                                       not_applicable={"unknown_word": IDS_AS_GIVEN, "contrast_is_target": "no contrast"}),
    "metrics.deletion_metrics": Entry(lambda m, x, n_prompt=2: metrics.deletion_metrics(m, x, n_prompt, [(0, 1), (1, 2)], [1.0, 0.5]),
                                      numeric="n_prompt", inputs=IDS,
                                      not_applicable={"unknown_word": IDS_AS_GIVEN, "contrast_is_target": "no contrast"}),
    "zoo.greedy_complete": Entry(lambda m, x, n_tokens=2: zoo.greedy_complete(m, x, n_tokens), numeric="n_tokens",
                                 not_applicable={"contrast_is_target": "greedy text, no contrast",
                                                 "float_ids": "takes a prompt string; a tensor is refused as not a string",
                                                 "out_of_range_ids": "takes a prompt string; a tensor is refused as not a string"}),
    "study.run": Entry(_study_run, numeric="min_delta",
                       not_applicable={"float_ids": "records hold text; ids never enter a study",
                                       "out_of_range_ids": "records hold text; ids never enter a study",
                                       "contrast_is_target": "the contrast is chosen from the model's top-k, never the wrong token",
                                       "batch_for_one": "a dataset is a batch of records by design"}),
    "cli explain": Entry(_cli(["explain"]), numeric="max-new-tokens",
                         contrast=lambda m: _run_cli(m, ["explain", PROMPT, "--target", " cat", "--contrast", " cat"]),
                         not_applicable={"float_ids": TEXT_ONLY, "out_of_range_ids": TEXT_ONLY, "batch_for_one": ONE_PROMPT}),
    "cli failure": Entry(_cli(["failure", "--correct", " cat"]),
                         contrast=lambda m: _run_cli(m, ["failure", PROMPT, "--wrong", " cat", "--correct", " cat"]),
                         not_applicable={"float_ids": TEXT_ONLY, "out_of_range_ids": TEXT_ONLY, "batch_for_one": ONE_PROMPT,
                                         "nan_number": "has no numeric option", "inf_number": "has no numeric option"}),
    "cli cage": Entry(_cli(["cage"]), numeric="max-new-tokens",
                      not_applicable={"float_ids": TEXT_ONLY, "out_of_range_ids": TEXT_ONLY, "batch_for_one": ONE_PROMPT,
                                      "contrast_is_target": "explains a continuation, no contrast"}),
    "estimate": Entry(lambda m, x, n_tokens=512: cage_lens.estimate(m, n_tokens), numeric="n_tokens",
                      not_applicable={case: "plans a run from the model's configuration and a token count: no text or ids"
                                      for case in CASES if case not in ("nan_number", "inf_number")}),
    "cli study": Entry(lambda m, x, **numeric: _study_cli(m, numeric), numeric="min-delta",
                       not_applicable={case: "its records go through study.run's gate (registered above)"
                                       for case in CASES if case not in ("nan_number", "inf_number")}),
}


def _study_cli(model, numeric):
    import tempfile

    with tempfile.TemporaryDirectory() as out:
        data = f"{out}/data.jsonl"
        with open(data, "w") as f:
            f.write('{"prompt": "the cat sat", "answer": " cat"}\n')
        _run_cli(model, ["study", data, "--model", "m", "--out", f"{out}/s"]
                 + [a for k, v in numeric.items() for a in (f"--{k}", str(v))])


#: public callables that take no model inputs (text, token ids, or settings of a computation on them)
NOT_INPUTS = {
    **{name: "an error class" for name in ("CageLensError", "InputError", "NumericalError", "UnsupportedModelError",
                                           "InsufficientMemoryError", "study.StoreError", "study.MissingExtraError")},
    **{name: "a result class, built by an entry point; loading checks it against the header schema (tests/test_persist.py)"
       for name in ("Attribution", "CircuitGraph", "ConservationReport", "FailureExplanation", "GenerationGraph",
                    "NeuronRelevance", "patching.Agreement", "study.StudyRun", "study.StudySummary", "study.Comparison",
                    "metrics.DeletionResult", "Estimate")},
    **{name: "takes a model (and rules), no inputs" for name in ("adapt", "ModelAdapter", "lrp", "rule_hooks")},
    "Architecture": "architecture facts read from a model",
    "RuleSet": "rule factors, checked finite by RuleSet itself (tests/test_rules.py, tests/test_persist.py)",
    "load": "reads a result file, validated against the header schema (tests/test_persist.py)",
    "load_hf_directory": "loads a model from a directory (tests/test_loading.py)",
    "from_hf_model": "wraps a Hugging Face model",
    "methods.Method": "the type of a base method",
    "methods.get_method": "looks a method up by name",
    "methods.register": "adds a method to the registry",
    "methods.eos_id": "reads the tokenizer's EOS id",
    "patching.Grid": "a grid description", "patching.PatchRules": "a rule variant (its base rule set is checked)",
    "patching.resolve_patch_rules": "looks a rule set up", "patching.pearson": "correlates two result grids",
    "patching.spearman": "correlates two result grids",
    "patching.PatchResult": "a result class, built by relevance_patch",
    "patching.default_method": "names a grid's default method",
    **{f"metrics.{name}": "computes on attribution scores or curves, not on model inputs"
       for name in ("ranking", "normalize_curve", "auc", "rise", "attribution_density", "mas", "rise_ap",
                    "attribution_coverage", "precision_at_k", "auroc", "bootstrap_ci", "paired_wins", "gini")},
    "metrics.graph_metrics": "computes on a built graph",
    **{f"study.{name}": "reads or aggregates a written store" for name in (
        "load", "load_graphs", "summary", "compare", "sign_flip_test", "holm", "report", "plot_segments", "plot_delta")},
    "study.Record": "a parsed record (study.read_records parses; study.run gates)",
    "study.read_records": "parses records; their prompts are gated when a study runs them (study.run above)",
    "study.StudySettings": "the settings study.run checks (min_delta registered above)",
    **{f"zoo.{name}": "builds zoo models or data from names and counts" for name in (
        "load", "list", "model_dir", "task", "tasks", "dataset", "Sample", "Task")},
    "cli zoo": "lists the shipped models; no inputs",
    "cli report": "reads a study store; a directory that is not one is refused (tests/test_cli.py)",
}


# ---------------------------------------------------------------------------- the registry is complete
def public_callables() -> set[str]:
    """Every public callable of cage_lens, with its namespace, and every CLI subcommand."""
    names = set()

    def walk(prefix: str, module) -> None:
        for name in module.__all__:
            value = getattr(module, name)
            if isinstance(value, types.ModuleType):
                walk(f"{prefix}{name}.", value)
            elif callable(value):
                names.add(prefix + name)

    walk("", cage_lens)
    subparsers = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return names | {f"cli {command}" for command in subparsers.choices}


def test_every_public_entry_point_is_registered():
    public = public_callables()
    assert not (set(REGISTRY) & set(NOT_INPUTS))
    unlisted = sorted(public - set(REGISTRY) - set(NOT_INPUTS))
    assert not unlisted, f"public callables neither in REGISTRY (hostile-input table) nor in NOT_INPUTS: {unlisted}"
    stale = sorted((set(REGISTRY) | set(NOT_INPUTS)) - public)
    assert not stale, f"registered names that are no longer public: {stale}"


# ---------------------------------------------------------------------------- the hostile-input table
def _cells():
    for name, entry in REGISTRY.items():
        for case in CASES:
            if case not in entry.not_applicable:
                yield pytest.param(name, case, id=f"{name}-{case}")


def test_every_case_is_driven_or_explained():
    """Each entry point meets every hostile input, or says why that input cannot reach it."""
    for name, entry in REGISTRY.items():
        for case in CASES:
            if case in entry.not_applicable:
                assert entry.not_applicable[case], (name, case)
            elif case in ("nan_number", "inf_number"):
                assert entry.numeric is not None, (name, case)
            elif case == "contrast_is_target":
                assert entry.contrast is not None, (name, case)
            else:
                assert case in entry.inputs, (name, case)


@pytest.mark.parametrize("name, case", list(_cells()))
def test_hostile_input_is_refused_in_one_line(name, case):
    model = cached_model("gpt2")
    entry = REGISTRY[name]
    if case == "contrast_is_target":
        call = lambda: entry.contrast(model)  # noqa: E731
    elif case in ("nan_number", "inf_number"):
        value = NAN if case == "nan_number" else INF
        good = GOOD_IDS if entry.inputs is IDS else PROMPT
        call = lambda: entry.call(model, good, **{entry.numeric: value})  # noqa: E731
    else:
        call = lambda: entry.call(model, entry.inputs[case])  # noqa: E731
    with pytest.raises(CageLensError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message, message
    assert re.search(CASES[case], message), message
    assert hook_count(model) == 0
