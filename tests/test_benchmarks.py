"""The benchmark harness: a results file is written only when the machine was not busier than its cores
(docs: benchmarks/harness.py), and no committed results file was taken on a busy machine."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import harness  # noqa: E402


def _watch(samples, own_threads=1):
    watch = harness.LoadWatch(own_threads=own_threads)
    watch.start_load, watch.end_load, watch.samples = samples[0], samples[-1], list(samples)
    return watch


def test_a_quiet_run_counts_and_a_busy_one_does_not(monkeypatch):
    monkeypatch.setattr(harness, "cores", lambda: 2)
    assert _watch([0.3, 1.9, 2.4, 2.1]).problem() is None          # our own 2 threads: up to 2.5
    assert "during the run" in _watch([0.3, 2.0, 2.6, 2.2]).problem()  # someone else ran meanwhile
    assert "at the start" in _watch([2.2, 1.0, 0.8]).problem()       # busy before we started


def test_write_results_refuses_then_marks_an_allowed_busy_file(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(harness, "cores", lambda: 2)
    out = tmp_path / "bench.md"
    busy = _watch([0.2, 3.7, 3.1])
    with pytest.raises(SystemExit) as exit_:
        harness.write_results(out, "# title\n\n| a |", busy)
    assert exit_.value.code == harness.BUSY_EXIT and not out.exists()
    assert "not writing" in capsys.readouterr().err
    harness.write_results(out, "# title\n\n| a |", busy, allow_busy=True)
    text = out.read_text()
    assert text.startswith(harness.BUSY_WARNING) and "highest 3.70" in text
    quiet = _watch([0.2, 1.1, 0.9])
    harness.write_results(out, "# title\n\n| a |", quiet)
    lines = out.read_text().splitlines()
    assert lines[0] == "# title" and lines[2].startswith("Load average (1 min) at start 0.20, at end 0.90")


def test_the_watch_samples_while_it_runs():
    watch = harness.LoadWatch(interval=0.01).start()
    import time

    time.sleep(0.1)
    watch.stop()
    assert len(watch.samples) >= 3 and watch.peak >= min(watch.samples)


def test_no_committed_results_file_was_taken_on_a_busy_machine():
    busy = [p.name for p in (ROOT / "benchmarks" / "results").glob("*.md") if harness.BUSY_WARNING in p.read_text()]
    assert busy == [], f"results written with --allow-busy are committed: {busy}"


def test_every_timing_benchmark_writes_through_the_harness():
    """A ``bench_*.py`` that wrote its results file itself would skip the load check."""
    scripts = sorted((ROOT / "benchmarks").glob("bench_*.py"))
    assert len(scripts) >= 7, [p.name for p in scripts]
    bypass = [p.name for p in scripts if "write_results(" not in p.read_text()]
    assert bypass == [], bypass


def test_the_watch_waits_for_a_lagging_average_to_settle(monkeypatch):
    """Just after another process ends, the 1-minute average still counts it: the watch waits (briefly) for
    it to fall to the cores before it records the start, and records a machine that stays busy."""
    loads = iter([3.0, 2.6, 1.2] + [1.2] * 50)
    monkeypatch.setattr(harness.os, "getloadavg", lambda: (next(loads), 0.0, 0.0))
    monkeypatch.setattr(harness, "cores", lambda: 2)
    monkeypatch.setattr(harness.time, "sleep", lambda s: None)
    watch = harness.LoadWatch(interval=0.01).start(settle=60)
    watch.stop()
    assert watch.start_load == 1.2 and watch.problem() is None
    monkeypatch.setattr(harness.os, "getloadavg", lambda: (3.0, 0.0, 0.0))
    busy = harness.LoadWatch(interval=0.01).start(settle=0)
    busy.stop()
    assert "at the start" in busy.problem()


def test_bench_scale_redo_measures_again_only_the_rows_of_this_run(tmp_path, monkeypatch):
    """``--redo`` with ``--measure-models`` measures that model's rows again and keeps every other
    measured row of the cache (it once dropped them all)."""
    import json

    import bench_scale

    cache = tmp_path / "bench_scale.json"
    kept = {"cpu_s": 50.0, "wall_s": 51.0, "peak_gb": 1.86, "command": "python benchmarks/bench_scale.py (earlier)"}
    cache.write_text(json.dumps({"Qwen3-1.7B|512|study case": kept, "Qwen3-0.6B|512|study case": {**kept, "cpu_s": 1.0}}))
    monkeypatch.setattr(bench_scale, "CACHE", cache)
    monkeypatch.setattr(bench_scale, "RESULTS", tmp_path)
    measured = []

    def fake_child(script, argv, memory, timeout, allocator_setting=True):
        measured.append(argv[:3])
        return {"cpu_s": 28.0, "wall_s": 28.5, "peak_gb": 1.47, "process_peak_gb": 2.6, "long_context": False}

    monkeypatch.setattr(bench_scale, "child", fake_child)
    monkeypatch.setattr(sys, "argv", ["bench_scale.py", "--models", "Qwen3-0.6B", "Qwen3-1.7B", "--tokens", "512",
                                      "--what", "study case", "--measure-models", "Qwen3-0.6B", "--redo", "--allow-busy"])
    bench_scale.main()
    rows = json.loads(cache.read_text())
    assert measured == [["Qwen3-0.6B", "512", "study case"]]
    assert rows["Qwen3-0.6B|512|study case"]["cpu_s"] == 28.0
    assert {k: rows["Qwen3-1.7B|512|study case"][k] for k in kept} == kept
    assert "| Qwen3-1.7B | 512 | study case | 3.20 | 50 | — | 51 | 1.86 |" in (tmp_path / "bench_scale.md").read_text()


def test_bench_scale_glibc_time_runs_each_row_again_under_glibcs_default(tmp_path, monkeypatch):
    """``--glibc-time``: after the measured child (the allocator setting the peak needs), a second child
    without it, whose CPU seconds fill the glibc column; the peak stays the first child's."""
    import json

    import bench_scale

    monkeypatch.setattr(bench_scale, "CACHE", tmp_path / "bench_scale.json")
    monkeypatch.setattr(bench_scale, "RESULTS", tmp_path)
    calls = []

    def fake_child(script, argv, memory, timeout, allocator_setting=True):
        calls.append(allocator_setting)
        return {"cpu_s": 40.0 if allocator_setting else 31.0, "wall_s": 41.0 if allocator_setting else 32.0,
                "peak_gb": 1.47 if allocator_setting else 9.9, "process_peak_gb": 2.6, "long_context": False}

    monkeypatch.setattr(bench_scale, "child", fake_child)
    monkeypatch.setattr(sys, "argv", ["bench_scale.py", "--models", "Qwen3-0.6B", "--tokens", "512", "--what",
                                      "study case", "--glibc-time", "--allow-busy"])
    bench_scale.main()
    row = json.loads((tmp_path / "bench_scale.json").read_text())["Qwen3-0.6B|512|study case"]
    assert calls == [True, False]
    assert (row["cpu_s"], row["glibc_cpu_s"], row["glibc_wall_s"], row["peak_gb"]) == (40.0, 31.0, 32.0, 1.47)
    assert "| Qwen3-0.6B | 512 | study case | 1.11 | 40 | 31 | 41 | 1.47 |" in (tmp_path / "bench_scale.md").read_text()


def test_bench_scale_shows_a_failed_glibc_run_beside_the_measured_row(tmp_path, monkeypatch):
    """A second child that fails under glibc's default (e.g. killed for memory the setting's run did not
    need) leaves the measured row and says so in the glibc column and the note."""
    import json

    import bench_scale

    monkeypatch.setattr(bench_scale, "CACHE", tmp_path / "bench_scale.json")
    monkeypatch.setattr(bench_scale, "RESULTS", tmp_path)

    def fake_child(script, argv, memory, timeout, allocator_setting=True):
        if not allocator_setting:
            return {"error": "killed by signal 9"}
        return {"cpu_s": 40.0, "wall_s": 41.0, "peak_gb": 1.47, "process_peak_gb": 2.6, "long_context": False}

    monkeypatch.setattr(bench_scale, "child", fake_child)
    monkeypatch.setattr(sys, "argv", ["bench_scale.py", "--models", "Qwen3-0.6B", "--tokens", "512", "--what",
                                      "study case", "--glibc-time", "--allow-busy"])
    bench_scale.main()
    row = json.loads((tmp_path / "bench_scale.json").read_text())["Qwen3-0.6B|512|study case"]
    assert (row["cpu_s"], row["glibc_error"]) == (40.0, "killed by signal 9") and "glibc_cpu_s" not in row
    line = next(l for l in (tmp_path / "bench_scale.md").read_text().splitlines() if "| Qwen3-0.6B | 512 | study case" in l)
    assert line.startswith("| Qwen3-0.6B | 512 | study case | 1.11 | 40 | failed | 41 | 1.47 |")
    assert "glibc's default allocator: killed by signal 9" in line


def test_a_child_killed_by_a_signal_says_which(tmp_path):
    import measure

    script = tmp_path / "killed_child.py"
    script.write_text("import os, signal, sys\nprint('loading', file=sys.stderr, flush=True)\n"
                      "os.kill(os.getpid(), signal.SIGKILL)\n")
    assert measure.child(str(script), []) == {"error": "killed by signal 9 after: loading"}


def test_a_child_runs_under_the_allocator_setting_unless_told_not_to(tmp_path, monkeypatch):
    import measure

    script = tmp_path / "env_child.py"
    script.write_text("import json, os\nprint(json.dumps({'mmap': os.environ.get('MALLOC_MMAP_THRESHOLD_')}))\n")
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "131072")
    assert measure.child(str(script), []) == {"mmap": "65536"}
    assert measure.child(str(script), [], allocator_setting=False) == {"mmap": None}


def test_bench_scale_refreshes_the_estimate_of_rows_outside_the_run(tmp_path, monkeypatch):
    """A run restricted by ``--what`` still brings every cached row's estimate columns up to date: the
    time law is fitted on all measured rows, and rows written before a column existed (the attention's
    share) were once fitted without it."""
    import json

    import cage_lens
    import bench_scale

    cache = tmp_path / "bench_scale.json"
    old = {"model": "Qwen3-0.6B", "tokens": 512, "what": "attribute", "cpu_s": 8.0, "wall_s": 9.0, "peak_gb": 1.44,
           "long_context": False, "flops": 1.0, "command": "python benchmarks/bench_scale.py (earlier)"}
    cache.write_text(json.dumps({"Qwen3-0.6B|512|attribute": old}))
    monkeypatch.setattr(bench_scale, "CACHE", cache)
    monkeypatch.setattr(bench_scale, "RESULTS", tmp_path)
    monkeypatch.setattr(bench_scale, "child", lambda *a, **k: pytest.fail("nothing is measured in this run"))
    monkeypatch.setattr(sys, "argv", ["bench_scale.py", "--models", "Qwen3-0.6B", "--tokens", "512", "--what", "study case",
                                      "--measure-models", "--allow-busy"])
    bench_scale.main()
    row = json.loads(cache.read_text())["Qwen3-0.6B|512|attribute"]
    expected = cage_lens.estimate({**bench_scale.MODELS["Qwen3-0.6B"], "torch_dtype": "bfloat16"}, 512, "attribute",
                                  long_context=False, line="bridge")
    assert row["attention_share"] == pytest.approx(expected.attention_share) and 0.1 < row["attention_share"] < 0.2
    assert row["flops"] == pytest.approx(expected.time_forwards * expected.forward_flops)
    assert row["cpu_s"] == 8.0


def test_bench_scale_scaling_law_recovers_the_attention_weight_and_the_rates():
    """Rows timed by a known law (attention operations 6.5× the blocks', a rate per computation) give that
    law back; with the weight mutated to 1 the fit leaves a residual."""
    import math

    import bench_scale

    rates = {"attribute": 4e-12, "cage table": 3e-12}
    rows = {}
    for i, (what, share) in enumerate([(w, s) for w in rates for s in (0.02, 0.12, 0.35, 0.6)]):
        flops = 1e13 * (1 + i)
        rows[str(i)] = {"what": what, "flops": flops, "attention_share": share,
                        "cpu_s": rates[what] * flops * (1 + 5.5 * share)}
    rows["unmeasured"] = {"what": "attribute", "flops": 1e14, "attention_share": 0.9}
    weight, fitted = bench_scale._scaling_law(rows)
    assert weight == pytest.approx(6.5, abs=1e-9)
    assert fitted == pytest.approx(rates, rel=1e-9)
    assert bench_scale._predicted_seconds(rows["unmeasured"], weight, fitted) == pytest.approx(4e-12 * 1e14 * (1 + 5.5 * 0.9))
    assert bench_scale._fit_span(rows, weight, fitted) == "1.00–1.00"
    residual = [math.log(r["cpu_s"] / bench_scale._weighted_ops(r, 1.0)) for r in rows.values() if "cpu_s" in r]
    assert max(residual) - min(residual) > 1.0


def test_gpu_checks_results_are_written_once_by_the_end_or_the_deadline_whichever_is_first():
    """On the GPU machine the deadline timer fired after the run had ended and wrote the results again,
    adding that the run had stopped at the deadline; the second writer now finds them written."""
    import gpu_check

    writes = []
    finish = gpu_check.WriteOnce(lambda stopped: writes.append(stopped) or 7)
    assert finish(stopped=False) == 7 and finish(stopped=True) is None and writes == [False]
    early = gpu_check.WriteOnce(lambda stopped: writes.append(stopped) or 0)
    assert early(stopped=True) == 0 and early(stopped=False) is None and writes == [False, True]


def test_gpu_checks_budget_predicts_a_row_from_the_most_alike_rows_run_before_it():
    """The committed GPU run predicted Qwen3-8B's attribute at 8,192 tokens at 475 s from the small
    Qwen3-0.6B's rate (a small model uses a GPU less well) and skipped it; the first run had measured it
    at 9.65 s. Same model first, then same computation and pass."""
    import gpu_check

    rates = {("Qwen3-0.6B", "attribute", False): [3e-12], ("Qwen3-8B", "attribute", False): [1e-13],
             ("Qwen3-8B", "default graph", False): [2e-13]}
    assert gpu_check._predicted_rate(rates, "Qwen3-8B", "attribute", True) == 1e-13
    assert gpu_check._predicted_rate(rates, "Qwen3-8B", "study case", False) == 2e-13
    assert gpu_check._predicted_rate(rates, "OLMo-3-7B", "attribute", False) == 3e-12
    assert gpu_check._predicted_rate(rates, "OLMo-3-7B", "whole graph", True) == 3e-12
    assert gpu_check._predicted_rate({}, "OLMo-3-7B", "attribute", False) == 0.0
    assert gpu_check._scale_row("Qwen3-8B:8192:whole graph") == ("Qwen3-8B", 8192, "whole graph")
    with pytest.raises(Exception, match="MODEL:TOKENS:COMPUTATION"):
        gpu_check._scale_row("Qwen3-8B:many:whole graph")


def test_gpu_checks_first_part_compares_row_chunks_of_the_cpus_size_on_cuda():
    """A GPU's chunk budget (a 32nd of its free memory) would leave the first part's 4,096-token
    attention eager; the part pins the CPU's 128 MB there, and restores the GPU's rule after."""
    import gpu_check

    from cage_lens.core.memory import attention_budget

    gb = 2**30
    assert attention_budget("cuda:0", 100 * gb) == 100 * gb / 32
    with gpu_check._cpu_chunk_budget():
        assert attention_budget("cuda:0", 100 * gb) == 128 * 2**20
    assert attention_budget("cuda:0", 100 * gb) == 100 * gb / 32


def test_gpu_checks_patching_rows_reach_the_routing_estimate_and_the_qk_fix():
    """The patching rows exist to run RAP's routing estimate and AtP*'s QK fix on cuda (their masks and
    row indices must follow the model's device): on the CPU, at the reduced sizes, every grid of the RAP
    row comes from the estimate (none exact), the AtP* row applies its fix, and their grids equal
    ``relevance_patch`` called directly with the same arguments."""
    import gpu_check
    import torch

    from cage_lens import patching

    model = gpu_check._models(quick=True)["gpt2-small shape, float32"]()
    tokens = torch.randint(3, 90, (16,), generator=torch.Generator().manual_seed(16))
    rap, star = gpu_check._run(model, "patch rap", tokens), gpu_check._run(model, "patch atp_star", tokens)
    assert rap.method == {"resid_pre": "rap: row-exact + cplrp", "attn_out": "rap: row-exact + cplrp",
                          "attn_head_out_all_pos": "rap: cplrp"}
    assert all(int((~e).sum()) > 0 for e in rap.exact.values())   # cells the patch changes, estimated
    assert set(star.method.values()) == {"atp*: gxi + QK fix"}
    clean = tokens[None].clone()
    clean[0, [3, 8]] += 1
    direct = patching.relevance_patch(model, tokens[None], model.run_with_cache(clean)[1],
                                      lambda logits: logits[0, -1, 7] - logits[0, -1, 8],
                                      list(gpu_check.PATCH_GRIDS), budget=1e-3)
    assert gpu_check._difference(gpu_check._values(direct), gpu_check._values(rap)) == 0.0


def test_the_estimate_holds_for_every_peak_the_gpu_check_measured():
    """Every row of bench_scale's computations that ``gpu_check`` ran on an H200 (the committed files
    ``benchmarks/gpu_reestimate.py`` reads; real Qwen3-0.6B/-8B and OLMo-3-7B configurations in bfloat16,
    2,048 and 8,192 tokens, both passes): the estimate for the run's plan within ±10 % of the measured peak
    (docs/estimate.md#on-an-accelerator; the CPU's counts alone gave 0.81 for Qwen3-0.6B's eager attention)."""
    import gpu_reestimate

    rows = [r for name in gpu_reestimate.FILES for r in gpu_reestimate.measured_rows(gpu_reestimate.RESULTS / name)]
    assert len(rows) == 26 and {r["model"] for r in rows} == {"Qwen3-0.6B", "Qwen3-8B", "OLMo-3-7B"}
    ratios = {(r["file"], r["model"], r["tokens"], r["what"]): gpu_reestimate.estimate_now(r, 139 * 2**30) / r["peak"]
              for r in rows}
    assert {k: round(v, 3) for k, v in ratios.items() if not 0.9 <= v <= 1.1} == {}
