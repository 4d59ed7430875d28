"""Failure studies (cage_lens.study): deviation and contrast rules on scripted cases, stored numbers
against cage_lens.attribute / explain_failure / circuit_graph, bad input, the SIGKILL-resume identity,
Ray == in-process, aggregation statistics, zoo datasets and the CLI. Both TL versions."""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import cage_lens
from cage_lens import study, zoo
from cage_lens.errors import InputError
from cage_lens.study.cases import ModelContext, process_chunk
from cage_lens.study.records import Record, read_records
from cage_lens.study.settings import StudySettings
from cage_lens.study.store import Store, StoreError
from cage_lens.zoo.datasets import dataset, solve

ROOT = Path(__file__).resolve().parents[1]
# float32 zoo models: a case attributed inside a padded batch vs alone differs by float32 rounding
F32 = dict(rtol=0, atol=2e-5)
# the same float32 numbers from another process or thread: float32 rounding (1.2e-7) grown by reductions
# over a few hundred terms, relative for large values (logits), absolute near zero (relevance)
ROUNDING = dict(rel_tol=1e-5, abs_tol=2e-5)


@lru_cache(maxsize=None)
def ioi_early():
    return zoo.load("ioi", checkpoint=100)


def tiny(kind: str = "gpt2"):
    """Random float64 models sharing the tiny tokenizer (built once per session by conftest)."""
    from conftest import cached_model

    return cached_model(kind)


def _quiet(**kw):
    return dict(progress=False, **kw)


# ---------------------------------------------------------------------------- scripted checker
PROMPT = "the cat sat on the mat and the dog ran to"


def scripted(record, text):
    """Verdicts from the record's script: open while the words are a prefix of an allowed sequence."""
    if record.extra.get("raise"):
        raise ZeroDivisionError("scripted failure")
    words = text.split()
    for seq in record.extra["allowed"]:
        if words == seq and record.extra.get("complete"):
            return "correct"
        if words == seq[: len(words)]:
            return "open"
    return "wrong"


def _greedy(model, steps):
    """Greedy ids and the full logits at each step, by plain single-row forwards."""
    tokens = model.to_tokens(PROMPT)
    ids, logits = [], []
    with torch.no_grad():
        for _ in range(steps):
            row = model(tokens)[0, -1]
            ids.append(int(row.argmax()))
            logits.append(row)
            tokens = torch.cat([tokens, torch.tensor([[ids[-1]]])], 1)
    return model.to_tokens(PROMPT)[0].tolist(), ids, logits


def test_deviation_contrast_and_sibling_on_scripted_cases(tmp_path):
    model, sibling = tiny("gpt2"), tiny("llama")
    word = lambda i: model.tokenizer.decode([i]).strip()  # noqa: E731
    prompt_ids, g, logits = _greedy(model, 4)
    ranking = torch.argsort(-logits[2], stable=True).tolist()
    with torch.no_grad():
        sib_logits = sibling(torch.tensor([prompt_ids + g[:2]]))[0, -1]
    sib_ranking = torch.argsort(-sib_logits, stable=True)[:10].tolist()
    from_sibling = next(t for t in sib_ranking if t not in ranking[:10])
    outside = next(t for t in ranking[10:] if t not in sib_ranking)
    w = [word(i) for i in g]
    records = [
        {"id": "rank3", "prompt": PROMPT, "allowed": [w[:2] + [word(ranking[3])], w[:2] + [word(ranking[5])]]},
        {"id": "sibling", "prompt": PROMPT, "allowed": [w[:2] + [word(from_sibling)]]},
        {"id": "none", "prompt": PROMPT, "allowed": [w[:2] + [word(outside)]]},
        {"id": "correct", "prompt": PROMPT, "allowed": [w[:2]], "complete": True},
        {"id": "raises", "prompt": PROMPT, "allowed": [], "raise": True},
        {"id": "undecided", "prompt": PROMPT, "allowed": [w + ["x"]]},
    ]
    study.run({"tiny": model}, records, tmp_path / "s", checker=scripted, sibling=sibling, max_new_tokens=3,
              min_delta=-1e9, chunk_size=4, stop_at_eos=False, **_quiet())
    df = study.load(tmp_path / "s").set_index("id")
    assert df["status"].to_dict() == {"rank3": "explained", "sibling": "explained", "none": "no_contrast",
                                      "correct": "correct", "raises": "skipped", "undecided": "undecided"}
    a = df.loc["rank3"]
    assert (a["deviation_step"], a["wrong_id"], a["contrast_id"], a["contrast_rank"]) == (2, g[2], ranking[3], 3)
    assert a["contrast_source"] == "model" and list(a["topk_ids"]) == ranking[:10]
    assert a["position"] == len(prompt_ids) + 1 and list(a["input_ids"]) == prompt_ids + g[:2]
    assert a["delta"] == pytest.approx(float(logits[2][g[2]] - logits[2][ranking[3]]), abs=1e-10)
    assert list(a["segments"]["_generated"]) == [len(prompt_ids), len(prompt_ids) + 1]
    single = cage_lens.attribute(model, torch.tensor(prompt_ids + g[:2]), target=g[2], contrast=ranking[3])
    np.testing.assert_allclose(a["relevance"], single.input_relevance[0].numpy(), rtol=1e-9, atol=1e-12)
    assert a["target_value"] == pytest.approx(float(single.target_value[0]), abs=1e-10)
    b = df.loc["sibling"]
    assert (b["contrast_source"], b["contrast_id"], b["contrast_rank"]) == ("sibling", from_sibling,
                                                                           sib_ranking.index(from_sibling))
    assert b["delta"] == pytest.approx(float(logits[2][g[2]] - logits[2][from_sibling]), abs=1e-10)
    assert "top-10 nor the sibling's" in df.loc["none", "reason"]
    assert list(df.loc["correct", "generated_ids"]) == g[:2] and df.loc["correct", "generated"].split() == w[:2]
    assert "ZeroDivisionError: scripted failure" in df.loc["raises", "reason"]
    assert df.loc["undecided", "reason"] == "no verdict within max_new_tokens=3"
    assert list(df.loc["undecided", "generated_ids"]) == g[:3]


def test_eos_ends_the_answer():
    """With stop_at_eos, an EOS token is a deviation unless the text before it is a correct answer."""
    model = tiny()
    _, g, logits = _greedy(model, 1)
    second = torch.argsort(-logits[0], stable=True)[1].item()
    ctx = ModelContext("tiny", model)
    ctx.eos = g[0]  # make the first greedy token the EOS token
    recs = [Record(0, PROMPT, "open", extra={"allowed": [[model.tokenizer.decode([second]).strip()]]}),
            Record(1, PROMPT, "done", extra={"allowed": [[]], "complete": True})]
    rows = process_chunk(ctx, recs, StudySettings(min_delta=-1e9), scripted).rows
    assert (rows[0]["status"], rows[0]["deviation_step"], rows[0]["wrong_id"]) == ("explained", 0, g[0])
    assert (rows[0]["contrast_id"], rows[0]["contrast_rank"]) == (second, 1)
    assert rows[1]["status"] == "correct" and rows[1]["generated_ids"] == [g[0]]


# ---------------------------------------------------------------------------- paired studies across chunks
WORDS = "the cat sat on mat and dog ran to big red box".split()


def test_paired_study_reads_each_chunks_own_anchor_rows(tmp_path):
    """With cases_from and several chunks, model b explains exactly a's case of the same record, chunk by
    chunk (a store read of the wrong chunk would leave b's later chunks without cases), with b's own Δℓ."""
    a_model, b_model = tiny("gpt2"), tiny("llama")
    rng = random.Random(4)
    records = [{"prompt": " ".join(rng.choice(WORDS) for _ in range(6)), "answer": " " + rng.choice(WORDS)}
               for _ in range(8)]
    out = tmp_path / "paired"
    study.run({"a": a_model, "b": b_model}, records, out, cases_from="a", chunk_size=2, top_k=a_model.cfg.d_vocab,
              min_delta=-1e9, **_quiet())
    df = study.load(out)
    a, b = (df[df["model"] == m].set_index("record") for m in ("a", "b"))
    explained = a.index[a["status"] == "explained"].tolist()
    assert {r // 2 for r in explained} == {0, 1, 2, 3}, a["status"].tolist()  # cases in every chunk
    for r in a.index:
        if r not in explained:
            assert b.loc[r, "status"] == "not_a_case"
            continue
        assert b.loc[r, "status"] == "explained" and b.loc[r, "contrast_source"] == "anchor"
        for column in ("input_ids", "prompt_len", "deviation_step", "position", "wrong_id", "contrast_id"):
            assert np.array_equal(b.loc[r, column], a.loc[r, column]), (r, column)
        with torch.no_grad():
            logits = b_model(torch.tensor([list(b.loc[r, "input_ids"])]))[0, -1]
        delta = float(logits[b.loc[r, "wrong_id"]] - logits[b.loc[r, "contrast_id"]])
        assert b.loc[r, "delta"] == pytest.approx(delta, abs=1e-10)  # b's own logits, a's case


# ---------------------------------------------------------------------------- checker fingerprints, settings
def _checker_with(threshold, default=2, table=None):
    table = table if table is not None else {"x": 1}

    def checker(record, text, width=default):
        return len(text.split()) < threshold + width + len(table)
    return checker


SHARED = {"limit": 3}


def checker_reading_a_global(record, text):
    return len(text.split()) < SHARED["limit"]


@pytest.mark.parametrize("changed", ["closure", "default", "global"])
def test_resume_refuses_a_checker_whose_closure_defaults_or_globals_changed(tmp_path, changed):
    records = [{"prompt": PROMPT}]
    kw = dict(max_new_tokens=2, **_quiet())
    first = checker_reading_a_global if changed == "global" else _checker_with(3)
    study.run({"tiny": tiny()}, records, tmp_path / "s", checker=first, **kw)
    same = checker_reading_a_global if changed == "global" else _checker_with(3)
    assert study.run({"tiny": tiny()}, records, tmp_path / "s", checker=same, resume=True, **kw).cases_before == 1
    if changed == "global":
        SHARED["limit"] = 4
        other = checker_reading_a_global
    else:
        other = _checker_with(4) if changed == "closure" else _checker_with(3, default=5)
    try:
        with pytest.raises(StoreError, match="checker: store"):
            study.run({"tiny": tiny()}, records, tmp_path / "s", checker=other, resume=True, **kw)
    finally:
        SHARED["limit"] = 3


def test_a_checker_that_cannot_be_fingerprinted_needs_a_version(tmp_path):
    import threading

    lock = threading.Lock()

    def checker(record, text):
        with lock:
            return len(text) < 3

    records = [{"prompt": PROMPT}]
    kw = dict(max_new_tokens=2, **_quiet())
    with pytest.raises(InputError, match=r"closure variable 'lock' .* is a _thread.lock, whose state cannot be "
                                         r"fingerprinted.*checker_version="):
        study.run({"tiny": tiny()}, records, tmp_path / "s", checker=checker, **kw)
    study.run({"tiny": tiny()}, records, tmp_path / "s", checker=checker, checker_version="v1", **kw)
    study.run({"tiny": tiny()}, records, tmp_path / "s", checker=checker, checker_version="v1", resume=True, **kw)
    with pytest.raises(StoreError, match="checker: store"):
        study.run({"tiny": tiny()}, records, tmp_path / "s", checker=checker, checker_version="v2", resume=True, **kw)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_settings_are_refused(tmp_path, value):
    with pytest.raises(InputError, match="min_delta must be a finite number"):
        study.run({"tiny": tiny()}, [{"prompt": PROMPT, "answer": " cat"}], tmp_path / "s", min_delta=value, **_quiet())
    with pytest.raises(InputError, match=r"graph_options\['node_threshold'\] must be finite"):
        study.run({"tiny": tiny()}, [{"prompt": PROMPT, "answer": " cat"}], tmp_path / "s",
                  graph_options={"node_threshold": value}, **_quiet())
    assert not (tmp_path / "s").exists()  # refused before anything is written


# ---------------------------------------------------------------------------- real zoo cases
@pytest.fixture(scope="module")
def ioi_store(tmp_path_factory):
    out = tmp_path_factory.mktemp("ioi") / "store"
    data = dataset("ioi", 24, seed=0)
    study.run({"early": ioi_early()}, data, out, chunk_size=8, graph=True, **_quiet())
    return out, data


def test_stored_case_equals_attribute_explain_failure_and_graph(ioi_store):
    out, data = ioi_store
    df = study.load(out)
    ex = df[df["status"] == "explained"]
    assert len(ex) >= 5
    model = ioi_early()
    graphs = {(g["model"], g["record"]): g for g in study.load_graphs(out)}
    for _, r in ex.head(4).iterrows():
        sample = zoo.task("ioi").sample(24, seed=0)[r["record"]]
        ids = torch.tensor(list(r["input_ids"]))
        fe = cage_lens.explain_failure(model, ids, wrong=int(r["wrong_id"]), correct=int(r["contrast_id"]))
        np.testing.assert_allclose(r["heatmap"], fe.heatmap.numpy(), **F32)
        np.testing.assert_allclose(r["relevance"], fe.relevance.numpy(), **F32)
        assert r["target_value"] == pytest.approx(fe.delta, abs=2e-5) and r["delta"] == pytest.approx(fe.delta, abs=2e-5)
        assert list(r["excluded"]) == fe.excluded == [0]
        # the zoo checker's contrast is the IO name: the best-ranked correct token of the model's top-10
        io_id = model.to_tokens(" " + sample.correct, prepend_bos=False)[0, 0].item()
        assert r["contrast_id"] == io_id and r["contrast_rank"] == list(r["topk_ids"]).index(io_id)
        # segments by hand: word i of the prompt sits at position i + 1
        heat = np.asarray(r["heatmap"])
        (io,), (s1, s2) = sample.meta["io_positions"], sorted(sample.meta["s_positions"])
        expected = {"io": heat[io], "s1": heat[s1], "s2": heat[s2], "context": heat[1:s2].sum(),
                    "query": heat[s2:].sum()}
        for name, value in expected.items():
            assert r["seg." + name] == pytest.approx(value, abs=1e-12), name
        assert r["segment_alignment"] == "offsets"
        metrics = cage_lens.circuit_graph(model, ids, target=int(r["wrong_id"]), contrast=int(r["contrast_id"]),
                                          levels="half").metrics()
        stored = graphs[("early", r["record"])]["metrics"]
        assert [m["edges"] for m in stored] == [m["edges"] for m in metrics] == [m["edges"] for m in r["graph_metrics"]]
        np.testing.assert_allclose([m["verticality"] for m in stored], [m["verticality"] for m in metrics], **F32)


def test_delta_filter_counts_and_reasons(ioi_store):
    df = study.load(ioi_store[0])
    assert (df.loc[df["status"] == "explained", "delta"] > 1).all()
    low = df[df["status"] == "low_delta"]
    assert len(low) > 0 and (low["delta"] <= 1).all()
    assert all(r.startswith("Δℓ = ") and r.endswith("≤ min_delta = 1") for r in low["reason"])
    counts = study.summary(df).counts.loc["early"]
    assert counts["low_delta"] == len(low) and counts["records"] == 24
    assert counts["failures"] == counts["explained"] + counts["low_delta"] + counts["no_contrast"]
    assert df["record"].tolist() == list(range(24))


def test_reference_answers_and_bad_records_from_jsonl(tmp_path):
    samples = zoo.task("ioi").sample(6, seed=3)
    lines = [json.dumps({"id": f"r{i}", "prompt": s.prompt, "answer": s.completion}) for i, s in enumerate(samples)]
    lines += [
        "{not json",
        json.dumps({"id": "empty", "prompt": ""}),
        json.dumps({"id": "badseg", "prompt": "when mary went", "answer": " to", "segments": {"a": [5, 2]}}),
        json.dumps({"id": "r0", "prompt": samples[0].prompt, "answer": " x"}),
        json.dumps({"id": "long", "prompt": " ".join(["mary"] * 70), "answer": " john"}),
        json.dumps({"id": "noanswer", "prompt": samples[0].prompt}),
        json.dumps({"id": "unknown-prompt", "prompt": "when mary and zelda went", "answer": " to"}),
        json.dumps({"id": "unknown-answer", "prompt": samples[0].prompt, "answer": " zelda"}),
    ]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    model = ioi_early()
    study.run({"early": model}, path, tmp_path / "s", chunk_size=5, **_quiet())
    df = study.load(tmp_path / "s")
    reasons = dict(zip(df["record"], df["reason"]))
    assert reasons[6] == "line 7 of data.jsonl is not valid JSON (Expecting property name enclosed in double quotes)"
    assert reasons[7] == "record 7 has no prompt (a non-empty string)"
    assert "segment 'a' = [5, 2] is not a non-empty range" in reasons[8]
    assert reasons[9] == "record 9 repeats id 'r0' (first used by record 0)"
    assert reasons[10] == "the prompt has 71 tokens but the model's context (n_ctx) is 64: no room to generate"
    assert reasons[11] == "the record has no answer and the study has no checker"
    assert reasons[12] == ("the prompt has 1 word(s) the model's vocabulary does not contain: 'zelda' "
                           "(each would become '<unk>')")
    assert reasons[13] == ("the answer has 1 word(s) the model's vocabulary does not contain: 'zelda' "
                           "(each would become '<unk>')")
    assert (df.loc[6:, "status"] == "skipped").all()
    for i, s in enumerate(samples):  # reference answers: compared token by token
        row = df.loc[i]
        with torch.no_grad():
            logits = model(model.to_tokens(s.prompt))[0, -1]
        io_id = model.to_tokens(s.completion, prepend_bos=False)[0, 0].item()
        top10 = torch.argsort(-logits, stable=True)[:10].tolist()
        if top10[0] == io_id:
            assert row["status"] == "correct"
        elif io_id not in top10:
            io = model.tokenizer.decode([io_id])
            assert row["status"] == "no_contrast" and row["reason"] == f"the reference token {io!r} is not in the model's top-10"
        else:
            assert row["wrong_id"] == top10[0] and row["contrast_id"] == io_id
            assert row["contrast_rank"] == top10.index(io_id)
            assert row["delta"] == pytest.approx(float(logits[top10[0]] - logits[io_id]), abs=2e-5)


def test_datasets_source_reads_like_a_list():
    datasets = pytest.importorskip("datasets", reason="the optional `datasets` package is not installed")
    data = dataset("pointer-chase", 5, seed=1)
    from_list = read_records(data.records)
    assert read_records(datasets.Dataset.from_list(data.records)) == from_list
    assert from_list[0].segments["hop1"] == tuple(data.records[0]["segments"]["hop1"])


# ---------------------------------------------------------------------------- resume
def _shard_table(path):
    return Store(path).table()


def assert_same_up_to_rounding(a, b, where: str = "store") -> None:
    """Equal except for floats, which agree to float32 rounding (ROUNDING): stores written by other processes
    (a killed run, Ray workers) come from other threads, whose float reductions may be split differently
    (torch's intra-op thread count is per thread), so they are compared at the dtype's rounding level,
    never bit for bit. Everything discrete — statuses, ids, positions, tokens — must be identical."""
    if isinstance(a, float) and isinstance(b, float):
        assert (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, **ROUNDING), (where, a, b)
    elif isinstance(a, dict) and isinstance(b, dict):
        assert list(a) == list(b), (where, list(a), list(b))
        for k in a:
            assert_same_up_to_rounding(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        assert len(a) == len(b), (where, len(a), len(b))
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_up_to_rounding(x, y, f"{where}[{i}]")
    else:
        assert type(a) is type(b) and a == b, (where, a, b)


def assert_stores_match(path, reference) -> None:
    assert Store(path).done() == Store(reference).done()
    table, expected = _shard_table(path), _shard_table(reference)
    assert table.schema == expected.schema
    assert_same_up_to_rounding(table.to_pylist(), expected.to_pylist())
    assert_same_up_to_rounding(list(study.load_graphs(path)), list(study.load_graphs(reference)), "graphs")


def test_resume_refuses_other_settings_version_data_and_concurrent_writers(ioi_store, tmp_path, monkeypatch):
    out, data = ioi_store
    run = dict(chunk_size=8, graph=True, **_quiet())
    again = study.run({"early": ioi_early()}, data, out, resume=True, **run)
    assert again.cases_written == 0 and again.cases_before == 24
    with pytest.raises(StoreError, match="already holds a study; pass resume=True"):
        study.run({"early": ioi_early()}, data, out, **run)
    with pytest.raises(StoreError, match="rules: store 'attnlrp', now 'cplrp'"):
        study.run({"early": ioi_early()}, data, out, resume=True, rules="cplrp", **run)
    with pytest.raises(StoreError, match="dataset: store"):
        study.run({"early": ioi_early()}, dataset("ioi", 24, seed=1), out, resume=True, **run)
    with pytest.raises(StoreError, match="models: store"):
        study.run({"early": zoo.load("ioi", checkpoint=200)}, data, out, resume=True, **run)
    monkeypatch.setattr(cage_lens, "__version__", "9.9.9")
    with pytest.raises(StoreError, match=r"written by cage_lens 0\.1\.0, this is cage_lens 9\.9\.9"):
        study.run({"early": ioi_early()}, data, out, resume=True, **run)
    monkeypatch.undo()
    holder = Store(out)
    holder.open(json.loads((out / "manifest.json").read_text()), resume=True)
    try:
        with pytest.raises(StoreError, match="another study run is writing"):
            study.run({"early": ioi_early()}, data, out, resume=True, **run)
    finally:
        holder.close()


def test_a_run_killed_before_its_manifest_can_start_again(tmp_path):
    out = tmp_path / "s"
    (out / "shards").mkdir(parents=True)
    (out / ".lock").touch()
    (out / ".manifest.json.tmp-123").write_text("{")
    run = study.run({"tiny": tiny()}, [{"prompt": PROMPT, "answer": " cat"}], out, **_quiet())
    assert run.cases_written == 1 and not list(out.rglob(".*.tmp-*"))
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["environment"]["torch"] = "0.0.1"  # library versions are recorded; a change only warns
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.warns(UserWarning, match=r"other library versions \(torch 0\.0\.1 → "):
        study.run({"tiny": tiny()}, [{"prompt": PROMPT, "answer": " cat"}], out, resume=True, **_quiet())
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(StoreError, match="is not empty and holds no study manifest"):
        study.run({"tiny": tiny()}, [{"prompt": PROMPT, "answer": " cat"}], tmp_path / "other", **_quiet())


KILL_SCRIPT = """
import os, signal, sys


class NoRay:  # the default engine must never import Ray: an import would end the run with an error
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "ray":
            raise ImportError("the in-process engine imported ray")


sys.meta_path.insert(0, NoRay())
import torch
torch.set_num_threads(1)
from cage_lens import study
from cage_lens.zoo.datasets import dataset
kill_at = int(os.environ.get("KILL_AT_REPLACE", "0"))
if kill_at:  # die just before the kill_at-th rename: a temporary file written, not yet renamed
    real, calls = os.replace, [0]
    def replace(src, dst):
        calls[0] += 1
        if calls[0] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(src, dst)
    os.replace = replace
study.run({"a": "ioi@100", "b": "ioi:tiny"}, dataset("ioi", 24, seed=5), sys.argv[1], cases_from="a",
          chunk_size=2, graph=True, threads=1, resume=True, progress=False)
"""


def test_sigkill_at_any_point_then_resume_is_identical(tmp_path):
    script = tmp_path / "kill_run.py"
    script.write_text(KILL_SCRIPT)
    store = tmp_path / "killed"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    rng = random.Random(12)
    total = 2 * 12  # two models × 24 records / chunk_size 2
    kills = []
    for plan in (("replace", 4), ("time", None), ("replace", 9)):
        before = len(Store(store).done()) if store.exists() else 0
        if plan[0] == "replace":
            proc = subprocess.run([sys.executable, str(script), str(store)], env=dict(env, KILL_AT_REPLACE=str(plan[1])),
                                  capture_output=True, text=True, timeout=300)
            code = proc.returncode
        else:
            proc = subprocess.Popen([sys.executable, str(script), str(store)], env=env,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            deadline = time.time() + 240
            while len(Store(store).done()) <= before and proc.poll() is None and time.time() < deadline:
                time.sleep(0.02)
            time.sleep(rng.uniform(0.0, 0.4))
            proc.send_signal(signal.SIGKILL)
            code = proc.wait()
        after = len(Store(store).done())
        kills.append((plan, code, before, after))
        assert code == -signal.SIGKILL, kills
        assert after < total, kills  # stopped midway
    assert any(k[3] > k[2] for k in kills)  # the killed runs made progress
    temporaries = list(store.rglob(".*.tmp-*"))
    assert temporaries  # a kill between write and rename left a temporary file behind
    kw = dict(cases_from="a", chunk_size=2, graph=True, threads=1, **_quiet())
    models, data = {"a": "ioi@100", "b": "ioi:tiny"}, dataset("ioi", 24, seed=5)
    finish = study.run(models, data, store, resume=True, **kw)  # the last resume, in this process
    assert finish.cases_before == 2 * kills[-1][3] and finish.cases_written == 48 - finish.cases_before
    assert not list(store.rglob(".*.tmp-*"))
    reference = tmp_path / "reference"
    study.run(models, data, reference, **kw)
    assert len(Store(store).done()) == total
    assert_stores_match(store, reference)
    df = study.load(store)
    assert len(df) == 48 and not df.duplicated(["model", "record"]).any() and df.attrs["missing"] == 0


# ---------------------------------------------------------------------------- Ray
def test_ray_engine_writes_the_same_store(tmp_path):
    """An in-process store with chunks missing, finished on a local 2-worker Ray cluster, equals the
    uninterrupted in-process store (one Ray stage: the chunks of model a; b's paired cases exist)."""
    pytest.importorskip("ray.data", reason="Ray Data (the optional extra cage-lens[ray]) is not installed")
    models = {"a": "ioi@100", "b": "ioi:tiny"}
    data = dataset("ioi", 16, seed=2)
    kw = dict(cases_from="a", chunk_size=4, threads=1, min_delta=0.0, **_quiet())
    study.run(models, data, tmp_path / "local", **kw)
    shutil.copytree(tmp_path / "local", tmp_path / "ray")
    (tmp_path / "ray" / ".lock").unlink()
    for k in (1, 2, 3):
        (tmp_path / "ray" / "shards" / f"{Store.chunk_name(0, k)}.parquet").unlink()
    ray_run = study.run(models, data, tmp_path / "ray", engine="ray", workers=2, resume=True, **kw)
    assert (ray_run.cases_written, ray_run.cases_before) == (12, 20)
    assert_stores_match(tmp_path / "ray", tmp_path / "local")
    explained = study.load(tmp_path / "ray").query("status == 'explained'")["model"].value_counts()
    assert explained["a"] == explained["b"] >= 4


def test_ray_refuses_loaded_models_and_missing_extras(tmp_path, monkeypatch):
    pytest.importorskip("ray.data", reason="Ray Data (the optional extra cage-lens[ray]) is not installed")
    with pytest.raises(cage_lens.InputError, match="must be given as specs"):
        study.run({"m": ioi_early()}, dataset("ioi", 2), tmp_path / "x", engine="ray", **_quiet())
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(study.MissingExtraError, match=r"pip install 'cage-lens\[ray\]'"):
        study.run("ioi@100", dataset("ioi", 2), tmp_path / "y", engine="ray", **_quiet())
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(study.MissingExtraError, match=r"pip install 'cage-lens\[plot\]'"):
        study.plot_delta(_synthetic())
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


# ---------------------------------------------------------------------------- aggregation
def _synthetic() -> pd.DataFrame:
    rows = []
    values = {"a": [0.5, 0.1, -0.2, 0.3], "b": [-0.5, -0.4, -0.6, 0.0]}
    for m, seg in values.items():
        for rec, v in enumerate(seg):
            rows.append({"model": m, "record": rec, "status": "explained", "delta": 2.0 + rec, "deviation_step": 0,
                         "contrast_source": "model", "seg.x": v, "seg_raw.x": 2 * v,
                         "top_wrong_segments": ["x"] if v > 0 else [], "top_correct_segments": ["x"] if v < 0 else []})
    rows.append({"model": "a", "record": 4, "status": "low_delta", "delta": 0.5, "deviation_step": 0,
                 "contrast_source": "model", "seg.x": np.nan, "seg_raw.x": np.nan,
                 "top_wrong_segments": None, "top_correct_segments": None})
    return pd.DataFrame(rows)


def test_summary_and_compare_statistics_pinned():
    from cage_lens.metrics import bootstrap_ci

    df = _synthetic()
    s = study.summary(df, n_boot=500)
    assert s.counts.loc["a", "failures"] == 5 and s.counts.loc["a", "usable"] == pytest.approx(0.8)
    assert s.delta.loc["a", "n"] == 5 and s.delta.loc["a", "mean"] == pytest.approx((2 + 3 + 4 + 5 + 0.5) / 5)
    row = s.segments.loc[("b", "x")]
    assert tuple(row[["mean", "ci_low", "ci_high"]]) == bootstrap_ci([-0.5, -0.4, -0.6, 0.0], n=500, seed=0)
    assert row["mean_raw"] == pytest.approx(-0.75)
    assert s.top.loc[("a", "x"), "top_wrong"] == 0.75 and s.top.loc[("b", "x"), "top_correct"] == 0.75
    c = study.compare(df, "a", "b", n_boot=500)
    t = c.table.loc["x"]
    diffs = np.array([-1.0, -0.5, -0.4, -0.3])
    assert c.n_pairs == 4 and t["diff"] == pytest.approx(diffs.mean())
    # exact sign-flip test over 2^4 sign patterns: |mean| ≥ 0.55 for all-minus and all-plus only
    assert t["p"] == pytest.approx(2 / 16) and (t["b_higher"], t["b_lower"], t["ties"]) == (0, 4, 0)
    assert c.table.loc["delta", "diff"] == 0 and c.table.loc["delta", "p"] == 1.0
    assert c.table["p_holm"].tolist() == study.holm([1.0, 2 / 16])
    assert "paired sign-flip permutation test" in c.to_markdown()


def test_sign_flip_and_holm_by_hand():
    assert study.sign_flip_test([1.0, 2.0, 3.0]) == pytest.approx(2 / 8)
    assert study.sign_flip_test([1.0, -1.0]) == 1.0
    # Monte Carlo branch (n > 16): only the all-plus and all-minus patterns reach the observed mean
    assert study.sign_flip_test(np.ones(20), n_perm=2000, seed=0) == pytest.approx(1 / 2001)
    assert study.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])


def test_report_is_self_contained(ioi_store, tmp_path):
    page = study.report(ioi_store[0], tmp_path / "r.html")
    assert page.startswith("<!DOCTYPE html>") and "http" not in page.replace("http-equiv", "")
    assert "Segment relevance" in page and "data:image/png;base64" in page and (tmp_path / "r.html").exists()


# ---------------------------------------------------------------------------- zoo datasets, CLI
@pytest.mark.parametrize("name", ["ioi", "pointer-chase", "facts", "arith"])
def test_zoo_dataset_checker_and_segments(name):
    data = dataset(name, 50, seed=4)
    samples = zoo.task(name).sample(50, seed=4)
    for r, s in zip(data.records, samples):
        assert solve(name, r["prompt"]) == r["answer"] == s.completion
        assert data.checker(r, r["answer"]) == "correct" and data.checker(r, "") == "open"
        assert data.checker(r, r["answer"][:-1] + "#") == "wrong"
    r, s = data.records[0], samples[0]
    text = {k: r["prompt"][a:b] for k, (a, b) in r["segments"].items()}
    if name == "ioi":
        assert text["io"] == s.correct and text["s1"] == text["s2"] == s.wrong
        assert text["context"] + " " + text["query"] == r["prompt"]
    elif name == "pointer-chase":
        chain = s.meta["chain"]
        assert [text[f"hop{t}"] for t in (1, 2, 3)] == [f"{chain[t]} > {chain[t + 1]} ;" for t in range(3)]
        assert text["query"] == f"start {chain[0]} :"
    elif name == "facts":
        facts = s.meta["facts"]
        assert [text["listed1"], text["listed2"]] == [" ".join(facts[c]) + " ." for c in s.meta["chosen"]]
    else:
        q = s.meta["query"]
        v = s.meta["aliases"][q]
        assert (text["alias_definition"], text["value_definition"]) == (f"{q} = {v} .", f"{v} = {s.meta['values'][v]} .")


def test_cli_study_and_report(tmp_path, capsys):
    from cage_lens.cli import main

    data = dataset("ioi", 6, seed=0).to_jsonl(tmp_path / "d.jsonl")
    out = tmp_path / "s"
    assert main(["study", str(data), "--model", "early=ioi@100", "--out", str(out), "--no-progress"]) == 0
    assert "6 cases written" in capsys.readouterr().out
    assert main(["study", str(data), "--model", "early=ioi@100", "--out", str(out), "--no-progress"]) == 2
    assert "already holds a study; pass resume=True (--resume)" in capsys.readouterr().err
    assert main(["study", str(data), "--model", "early=ioi@100", "--out", str(out), "--resume", "--no-progress",
                 "--top-k", "5"]) == 2
    assert "top_k: store 10, now 5" in capsys.readouterr().err
    assert main(["study", str(data), "--model", "early=ioi@100", "--out", str(out), "--resume", "--no-progress"]) == 0
    assert "0 cases written, 6 already there" in capsys.readouterr().out
    assert main(["report", str(out)]) == 0
    assert (out / "report.html").read_text().startswith("<!DOCTYPE html>")
    assert len(study.load(out)) == 6


def test_the_generation_steps_logits_are_computed_on_the_models_device():
    """The study's generation step builds its padded tokens on the CPU; on a GPU model they reached the
    embedding there ("index is on cpu", found by benchmarks/gpu_check.py on cuda). ``logits_at`` hands
    the model its tokens, and selects the rows, on the model's device (here the meta device stands in
    for cuda: a CPU-only machine has no second device with data)."""
    from types import SimpleNamespace

    from cage_lens.core.engine import logits_at

    seen = []

    def model(tokens):
        seen.append(tokens.device.type)
        return torch.zeros(*tokens.shape, 11, device=tokens.device)

    adapter = SimpleNamespace(hook_points={}, call_hooks=set(), device=torch.device("meta"), model=model)
    logits = logits_at(adapter, torch.tensor([[1, 2, 3], [4, 5, 0]]), [2, 1])
    assert seen == ["meta"] and logits.device.type == "meta" and tuple(logits.shape) == (2, 11)
