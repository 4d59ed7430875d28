"""Architecture coverage: run the checks of docs/architectures.md on every family and write the table.

For each family and TransformerLens line (a random tiny model, 2 layers, float64): does the line load
it; are forward values bit-identical under ``lrp``; does the completeness certificate pass (and its
error); does CP-LRP conserve relevance on the bias-free model; do AttnLRP and CP-LRP equal LXT
(families with an LXT map, from the committed fixtures); does the closed-form graph equal autograd
(or refuse, and why); does ``cage`` run. Each interpreter writes ``benchmarks/results/raw/
coverage_<line>.json``; the table ``benchmarks/results/coverage.md`` is rendered from all of them.

    python scripts/coverage.py --python <TL 4.3 venv>/bin/python <TL 2.18 venv>/bin/python
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RAW = ROOT / "benchmarks" / "results" / "raw"
OUT = ROOT / "benchmarks" / "results" / "coverage.md"
PROMPT = "the cat sat on the mat and john"


def _check(fn) -> dict:
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - every outcome is a table cell
        return {"ok": False, "note": f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"}


def run_line() -> dict:
    """All checks for every family on the installed TL line."""
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "tests"))
    warnings.filterwarnings("ignore")
    import torch

    import cage_lens
    from cage_lens import methods
    from cage_lens.core.adapter import adapt
    from cage_lens.core.certificate import certify
    from cage_lens.circuit.builder import circuit_graph
    from cage_lens.errors import UnsupportedModelError
    from cage_lens.loading import has_hooked_transformer
    from cage_lens.testing import FAMILIES, random_model, supported_families

    torch.set_num_threads(1)
    line = "TL 2.18 (HookedTransformer)" if has_hooked_transformer() else "TL 4.3 (TransformerBridge)"
    lxt = json.loads((ROOT / "tests" / "fixtures" / "lxt" / "reference.json").read_text())
    rows = {}
    for family in FAMILIES:
        if family not in supported_families():
            rows[family] = {"supported": False}
            continue
        model = random_model(family)
        tokens = model.to_tokens(PROMPT)
        row = {"supported": True}

        def forward():
            plain = model(tokens)
            with cage_lens.lrp(model, "attnlrp"):
                same = torch.equal(model(tokens), plain)
            return {"ok": same}

        def certificate():
            start = time.perf_counter()
            cert = certify(adapt(model))
            return {"ok": cert.passed and cert.max_error <= 1e-12, "error": cert.max_error,
                    "seconds": time.perf_counter() - start, "note": "" if cert.passed else cert.reason}

        def conservation():
            bias_free = random_model(family, biases=False)
            error = cage_lens.attribute(bias_free, PROMPT, target=7, rules="cplrp").conservation.max_error()
            return {"ok": error < 1e-12, "error": error}

        def graph():
            ref = circuit_graph(model, PROMPT, 5, method="autograd", levels="half", node_threshold=None, top_p=None,
                                batch_size=64)
            try:
                fast = circuit_graph(model, PROMPT, 5, levels="half", node_threshold=None, top_p=None)
            except UnsupportedModelError as exc:
                return {"ok": True, "refused": str(exc).split("edges: ")[-1].split(" and the scores")[0].split("; use")[0]}
            worst = 0.0
            for es in fast.edge_sets:
                a, b = fast.edge_matrix(es.source, es.target), ref.edge_matrix(es.source, es.target)
                scale = max(float(b.abs().max()), float(fast.node_relevance(es.source).abs().max()), 1e-30)
                worst = max(worst, float((a - b).abs().max()) / scale)
            return {"ok": worst < 1e-5, "error": worst}

        def cage():
            n_prompt = tokens.shape[1] - 2
            g = cage_lens.cage(model, tokens[0, :n_prompt], completion=tokens[0, n_prompt:])
            naive = methods.naive_table(model, tokens, n_prompt, "attnlrp")
            error = float((g.table[:, : tokens.shape[1]] - naive).abs().max() / naive.abs().max())
            return {"ok": error < 1e-5, "error": error}

        def lxt_agreement():
            if family not in lxt["families"]:
                return {"ok": None, "note": "no LXT map"}
            from test_lxt_agreement import fixture_model

            fixture, ids = fixture_model(family), torch.tensor([lxt["tokens"]])
            errors = {}
            for rules in ("attnlrp", "cplrp"):
                ours = cage_lens.attribute(fixture, ids, target=lxt["target"], rules=rules).token_relevance[0]
                ref = torch.tensor(lxt["families"][family][rules], dtype=torch.float64)
                errors[rules] = float((ours - ref).abs().max() / ref.abs().max())
            return {"ok": max(errors.values()) < 1e-5, "error": max(errors.values()), **errors}

        for name, fn in (("certificate", certificate), ("forward", forward), ("conservation", conservation),
                         ("lxt", lxt_agreement), ("graph", graph), ("cage", cage)):
            row[name] = _check(fn)
        rows[family] = row
        print(family, {k: v.get("ok") for k, v in row.items() if isinstance(v, dict)}, flush=True)
    return {"line": line, "torch": torch.__version__, "families": rows}


def _cell(check: dict | None) -> str:
    if check is None:
        return ""
    if check.get("refused"):
        return f"refused: {check['refused']} (autograd ✓)"
    if check.get("ok") is None:
        return check.get("note", "—")
    mark = "✓" if check["ok"] else "✗"
    value = f" {check['error']:.0e}" if "error" in check else ""
    note = "" if check["ok"] or not check.get("note") else f" {check['note']}"
    return f"{mark}{value}{note}"


def render() -> str:
    lines_data = [json.loads(p.read_text()) for p in sorted(RAW.glob("coverage_*.json"))]
    out = [
        "# Architecture coverage",
        "",
        "Generated by `python scripts/coverage.py --python <TL 4.3 python> <TL 2.18 python>` (random tiny models,",
        "2 layers, float64). Columns: forward values bit-identical under `lrp`; completeness certificate",
        "(max relative error of the CP-LRP identity, must be ≤ 1e-12); CP-LRP conservation on the bias-free",
        "model (max relative error); AttnLRP and CP-LRP token relevance against LXT (max relative error of",
        "the two, committed fixtures); closed-form graph against autograd (`levels=\"half\"`, AttnLRP, max",
        "error relative to the edge scale; HF modules computing in float32 inside the float64 model limit",
        "it to ~1e-7); CAGE table against the naive per-step loop. Certificate cost per model in seconds.",
        "",
    ]
    for data in lines_data:
        out += [f"## {data['line']}", "",
                "| family | forward | certificate | s | CP-LRP conservation | LXT | fast = autograd | CAGE |",
                "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for family, row in data["families"].items():
            if not row["supported"]:
                out.append(f"| {family} | no conversion on this line (refused by name) | | | | | | |")
                continue
            cert = row["certificate"]
            out.append(
                f"| {family} | {_cell(row['forward'])} | {_cell(cert)} | {cert.get('seconds', 0):.2f} | "
                f"{_cell(row['conservation'])} | {_cell(row['lxt'])} | {_cell(row['graph'])} | {_cell(row['cage'])} |"
            )
        out.append("")
    return "\n".join(out)


README = ROOT / "README.md"
README_START = "<!-- coverage summary: written by scripts/coverage.py from benchmarks/results/raw/coverage_*.json -->"
README_END = "<!-- end of coverage summary -->"


def _summary_cell(row: dict) -> str:
    if not row["supported"]:
        return "no conversion (refused by name)"
    checks = [row[k] for k in ("forward", "certificate", "conservation", "cage")]
    if not all(c.get("ok") for c in checks):
        failed = [k for k in ("forward", "certificate", "conservation", "cage") if not row[k].get("ok")]
        return "✗ " + ", ".join(failed)
    parts = ["certified"]
    lxt = row["lxt"]
    if lxt.get("ok") is not None:
        parts.append("= LXT" if lxt["ok"] else "✗ LXT")
    graph = row["graph"]
    parts.append("autograd graph only" if graph.get("refused") else "fast graph" if graph.get("ok") else "✗ graph")
    return " · ".join(parts)


def render_summary() -> str:
    """The README's compact table: one row per family, one column per TransformerLens line."""
    lines_data = [json.loads(p.read_text()) for p in sorted(RAW.glob("coverage_*.json"), reverse=True)]
    families = list(dict.fromkeys(f for data in lines_data for f in data["families"]))
    out = [README_START, "",
           "| family | " + " | ".join(data["line"] for data in lines_data) + " |",
           "| --- |" + " --- |" * len(lines_data)]
    for family in families:
        cells = [_summary_cell(data["families"][family]) if family in data["families"] else "—" for data in lines_data]
        out.append(f"| {family} | " + " | ".join(cells) + " |")
    out += ["", README_END]
    return "\n".join(out)


def write_readme_summary() -> None:
    text = README.read_text()
    start, end = text.index(README_START), text.index(README_END) + len(README_END)
    README.write_text(text[:start] + render_summary() + text[end:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python", nargs="*", default=None, help="interpreters (one per TL line) to run the checks in")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    RAW.mkdir(parents=True, exist_ok=True)
    if args.child or not args.python:
        data = run_line()
        name = "tl2" if "2.18" in data["line"] else "tl4"
        (RAW / f"coverage_{name}.json").write_text(json.dumps(data, indent=1))
        if args.child:
            return
    for python in args.python or []:
        subprocess.run([python, __file__, "--child"], check=True)
    OUT.write_text(render() + "\n")
    write_readme_summary()
    print(f"wrote {OUT} and the README's coverage summary")


if __name__ == "__main__":
    main()
