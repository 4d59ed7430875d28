# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Tutorial 5 — failure studies over a whole dataset
#
# Tutorial 2 explained a handful of IOI failures by hand. `cage_lens.study` runs that workflow
# (Tan et al. 2026) over a dataset in one call: generate greedily, find the first token after which
# the answer can no longer be correct, pick the contrast token (the best-ranked correct token of the
# model's top-10), drop weak cases (Δℓ ≤ 1), explain the rest (heatmap, segment relevance, layer
# trace), and store everything in a resumable Parquet store. Then aggregate with confidence
# intervals and compare training checkpoints. Runs offline; the study's store and report go to
# `tutorial-runs/` in the working folder. Exercises: *predict, then check* (solutions folded).

# %%
# %matplotlib inline
import shutil
from pathlib import Path

from cage_lens import study
from cage_lens.views.terminal import terminal_heatmap
from cage_lens.zoo.datasets import dataset

data = dataset("ioi", 120, seed=5)
record = data.records[0]
print(record["prompt"], "→", repr(record["answer"]))
print({name: record["prompt"][a:b] for name, (a, b) in record["segments"].items()})
print("checker:", data.checker(record, record["answer"]), data.checker(record, " bob"), data.checker(record, ""))

# %% [markdown]
# ## One call: three checkpoints, paired on the early model's failures
# `cases_from="step-100"`: the step-100 checkpoint runs the whole pipeline on its own generations;
# the later checkpoints explain **the same cases** (same input, same wrong and contrast tokens), so
# the comparison is paired. A malformed record does not stop the study: it is stored as skipped,
# with the reason.

# %%
records = data.records + [{"id": "broken", "prompt": "when mary and john", "segments": {"x": [3, 1]}}]
out = Path("tutorial-runs") / "ioi-study"  # in the working folder
shutil.rmtree(out, ignore_errors=True)  # a fresh store (a second run would need resume=True)
models = {"step-100": "ioi@100", "step-500": "ioi@500", "final": "ioi"}
run = study.run(models, records, out, checker=data.checker, cases_from="step-100")
print(run)
df = study.load(out)
print(df[df["id"] == "broken"][["model", "status", "reason"]].to_string(index=False))
assert (df[df["id"] == "broken"]["status"] == "skipped").all()

# %% [markdown]
# ## Summary: counts, Δℓ, segment relevance with 95 % bootstrap CIs
# Segment relevance = Σ relevance over the segment's tokens ÷ max |R| over non-special tokens.
# Positive supports the wrong token, negative the correct one.

# %%
s = study.summary(df)
early = s.counts.loc["step-100"]
print(f"step 100: {int(early['failures'])} failures, {int(early['explained'])} explained "
      f"(usable rate {early['usable']:.2f}: the rest had Δℓ ≤ 1 or no correct token in the top-10)")
assert early["failures"] >= 0.3 * len(data.records)

# The early model's wrong answer is the repeated subject: its first mention (s1) carries the largest
# wrong-supporting relevance, while the indirect-object name (io) argues for the correct answer.
s1, io = s.segments.loc[("step-100", "s1")], s.segments.loc[("step-100", "io")]
assert s1["ci_low"] > 0.5 and io["ci_high"] < 0
assert s.top.loc[("step-100", "s1"), "top_wrong"] > 0.8
s  # in a notebook: the four tables (print(s) gives them as markdown)

# %%
study.plot_segments(s)  # mean segment relevance per checkpoint with 95 % CIs (matplotlib)

# %% [markdown]
# ## Which segment's relevance changes with training?
# `compare` pairs the cases by record: mean difference (final − step-100) with a bootstrap CI and a
# paired sign-flip permutation test, Holm-adjusted across segments.

# %%
c = study.compare(df, "step-100", "final")
t = c.table
assert t.loc["delta", "ci_high"] < 0          # on the same prompts the final model prefers the correct name
assert t.loc["io", "ci_high"] < 0             # the IO name argues harder for the correct answer ...
assert t.loc["s1", "ci_high"] < 0             # ... and the first subject mention less for the wrong one
assert t.loc["io", "p_holm"] < 0.05 and t.loc["s1", "p_holm"] < 0.05
c

# %% [markdown]
# ### Exercise 1 — predict, then check
# The final model explains the step-100 model's failures (same prompts, same wrong and correct names).
# On how many of these paired cases does the final model **still** prefer the wrong name (Δℓ > 0)?
# Predict a number (or a share).

# %% tags=["exercise"]
my_prediction = None  # a count of paired cases

# %% tags=["solution"] jupyter={"source_hidden": true}
paired_cases = df[(df["model"] == "final") & (df["status"] == "explained")]
answer = int((paired_cases["delta"] > 0).sum())
print(f"{answer} of {len(paired_cases)} paired cases still prefer the wrong name under the final model")
assert len(paired_cases) == int(c.n_pairs) and answer <= 0.1 * len(paired_cases)
print("answer:", answer, "| your prediction:", my_prediction, "✓" if my_prediction == answer else "")

# %% [markdown]
# ## One stored case
# Every number is in the row: the input, wrong and contrast tokens, Δℓ, the heatmap (as
# `explain_failure` computes it), the layer trace.

# %%
case = df[(df["model"] == "step-100") & (df["status"] == "explained")].iloc[0]
print(f"wrong {case['wrong']!r} vs correct {case['contrast']!r} (rank {case['contrast_rank']} of the top-10), "
      f"Δℓ = {case['delta']:+.3f}")
print(terminal_heatmap(list(case["str_tokens"]), list(case["heatmap"]), color=False))
paired = df[(df["model"] == "final") & (df["record"] == case["record"])].iloc[0]
print(f"final checkpoint on the same case: Δℓ = {paired['delta']:+.3f}")
print(terminal_heatmap(list(paired["str_tokens"]), list(paired["heatmap"]), color=False))

# %% [markdown]
# The stored heatmap is what `explain_failure` computes for the same input, wrong and correct token;
# calling it on the stored case gives the full view (heatmap, layer trace, graph).

# %%
import numpy as np
import torch

import cage_lens
from cage_lens import zoo

recomputed = cage_lens.explain_failure(zoo.load("ioi", checkpoint=100), torch.tensor(list(case["input_ids"])),
                                       wrong=int(case["wrong_id"]), correct=int(case["contrast_id"]))
assert np.allclose(recomputed.heatmap.numpy(), case["heatmap"], atol=1e-5)  # float32 model, two batch layouts
recomputed

# %% [markdown]
# ## Resume and report
# The store is append-only and resumable: a rerun with `resume=True` computes only what is missing
# (nothing here). `cage-lens report DIR` or `study.report` writes a self-contained HTML page.

# %%
again = study.run(models, records, out, checker=data.checker, cases_from="step-100", resume=True, progress=False)
assert again.cases_written == 0 and again.cases_before == 3 * len(records)
page = study.report(df, out.parent / "report.html")
print("report:", out.parent / "report.html", f"({len(page) // 1024} kB)")
assert page.index("<h3>Summary</h3>") < page.index("<details>")  # the findings first, the settings folded
