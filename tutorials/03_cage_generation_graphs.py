# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Tutorial 3 — CAGE: attributing a whole generation, through earlier generated tokens
#
# In the `pointer-chase` zoo task the prompt lists facts `key > value` and a start key; the model
# generates a chain where every token is the value of the previous *generated* token. So the third
# generated token depends on the prompt **through** the first two generations. Direct ("row")
# attribution of the last token sees only its immediate inputs; CAGE (Walker & Ewetz 2025;
# docs/cage.md) follows every path through earlier generations. Runs offline. Exercises: *predict,
# then check* — the solutions are folded under each one.

# %%
# %matplotlib inline
import torch

import cage_lens
from cage_lens import metrics, zoo

model = zoo.load("pointer-chase")
sample = zoo.task("pointer-chase").sample(1, seed=7)[0]
print("prompt:    ", sample.prompt)
print("completion:", sample.completion, "| chain", sample.meta["chain"])

# %% [markdown]
# ## A token-level generation graph
# `cage` teacher-forces the completion, computes an AttnLRP attribution table `[Y, P+Y]` from one
# batched forward/backward (row t explains the log-prob of generated token t), normalises rows as in
# the paper (clamp ≥ 0, rows sum to 1) and marginalises over paths with a triangular solve.

# %%
graph = cage_lens.cage(model, sample.prompt, completion=sample.completion, method="attnlrp")
print(graph)
last = graph.n_generated - 1
row = graph.row_attribution(outputs=[last])
ctx = graph.context_attribution(outputs=[last])
print("mass of the last token's explanation: row", float(row.sum()), " CAGE", float(ctx.sum()))
# CAGE conserves the unit mass of the output row across paths; the direct edges into the prompt hold less.
# (Not exactly 1: the paper's normalisation divides by Σ + 1e-8, which costs a row with little positive
# mass up to 1e-8 / Σ of its unit.)
assert graph.empty_rows == [] and abs(float(ctx.sum()) - 1) < 1e-3
assert float(row.sum()) < float(ctx.sum())
graph  # in a notebook: the interactive graph (hover, click a node, zoom) and the CAGE vs row table

# %%
graph.plot()

# %% [markdown]
# ### Exercise 1 — predict, then check
# The chain is `start → v1 → v2 → …`. For the **last** generated token, which prompt position gets the
# largest CAGE attribution: the start key in the query, or a token inside one of the facts? Predict
# `"query"` or `"fact"`.

# %% tags=["exercise"]
my_prediction = None  # "query" or "fact"

# %% tags=["solution"] jupyter={"source_hidden": true}
top = int(ctx.argmax())
answer = "query" if top >= sample.meta["start_position"] else "fact"
print(f"largest CAGE attribution: {graph.labels[top]!r}@{top} -> {answer}; true sources: {sorted(sample.total_sources[last])}")
assert answer == "fact" and top in sample.total_sources[last]  # the value tokens carry the answer (routing is not content)
print("answer:", answer, "| your prediction:", my_prediction, "✓" if my_prediction == answer else "")

# %% [markdown]
# ## Does CAGE find the true sources?
# The zoo's ground truth `total_sources[t]` lists every prompt position generated token t depends on
# through the chain. Compare how well row attribution and CAGE rank those positions (AUROC: 1 is
# perfect, 0.5 is chance) for the last generated token.

# %%
truth = sorted(sample.total_sources[last])
candidates = list(range(1, graph.n_prompt))  # every prompt position except BOS
print("true sources of the last token:", truth)
auroc_row, auroc_cage = metrics.auroc(row, truth, candidates), metrics.auroc(ctx, truth, candidates)
print(f"AUROC  row attribution {auroc_row:.3f}   CAGE {auroc_cage:.3f}")
assert auroc_cage > auroc_row

# %% [markdown]
# ## Over many samples, with confidence intervals
# (The full reproduction over all base methods and tasks is `benchmarks/cage_eval.py`.)

# %%
row_scores, cage_scores = [], []
for s in zoo.task("pointer-chase").sample(30, seed=11):
    g = cage_lens.cage(model, s.prompt, completion=s.completion, method="attnlrp")
    t = g.n_generated - 1
    cands = list(range(1, g.n_prompt))
    row_scores.append(metrics.auroc(g.row_attribution(outputs=[t]), sorted(s.total_sources[t]), cands))
    cage_scores.append(metrics.auroc(g.context_attribution(outputs=[t]), sorted(s.total_sources[t]), cands))
summary = {}
for name, scores in (("row", row_scores), ("CAGE", cage_scores)):
    summary[name] = mean, lo, hi = metrics.bootstrap_ci(scores)
    print(f"{name:5s} AUROC {mean:.3f}  95% CI [{lo:.3f}, {hi:.3f}]")
wins = metrics.paired_wins(cage_scores, row_scores)
print("paired wins (CAGE vs row):", wins)
assert summary["CAGE"][0] > summary["row"][0] and wins["wins"] > 3 * wins["losses"]

# %% [markdown]
# ## The signed variant
# The paper's normalisation drops negative (inhibitory) edges. `normalize="signed"` keeps signs
# (rows scaled by Σ|·|) and propagates them the same way.

# %%
signed = cage_lens.cage(model, sample.prompt, completion=sample.completion, normalize="signed")
print("signed CAGE, last token:", [round(v, 3) for v in signed.context_attribution(outputs=[last]).tolist()])
assert torch.allclose(signed.adjacency.abs().sum(-1), torch.ones(signed.n_generated, dtype=torch.float64))  # Σ|·| = 1
assert (signed.adjacency < 0).any()  # the inhibitory edges the paper's normalisation drops
