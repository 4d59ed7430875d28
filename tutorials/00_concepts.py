# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Tutorial 0 — what "this token matters" can mean: gradient × input, relevance, activation patching
#
# Three questions that sound alike and are not:
#
# | method | asks | cost |
# | --- | --- | --- |
# | **gradient × input** | if this input moved a little along itself, how would the output move? (a local slope) | one backward |
# | **relevance (LRP)** | how much of *this* output value is made of this input, when the value is split back layer by layer so that nothing is lost? | one backward, with rules |
# | **activation patching** | if this activation were what it is in *another* prompt, how much would the output change? (a causal effect) | one forward per patched activation |
#
# Everything runs offline on the zoo's IOI model (3 layers, word-level vocabulary) and on its
# pointer-chase model. Exercises: *predict, then check* — write your prediction in the exercise cell,
# then open the folded solution cell below it and run it.

# %%
import os

os.environ.setdefault("TQDM_DISABLE", "1")  # TransformerLens' patching sweeps draw progress bars

import torch
import transformer_lens.patching as tl_patching

import cage_lens
from cage_lens import patching, zoo

torch.set_num_threads(2)
model = zoo.load("ioi")
prompt = "when mary and john went to the store , john gave a drink to"
tokens = model.to_tokens(prompt)


def token_id(word):
    return int(model.to_tokens(word, prepend_bos=False)[0, 0])


MARY, JOHN = token_id(" mary"), token_id(" john")
print(model.to_str_tokens(tokens))

# %% [markdown]
# ## 1. One prediction, three answers
# The model prefers the indirect object "mary" over the repeated subject "john". We explain the logit
# difference `logit(mary) − logit(john)` with gradient × input (`rules="gxi"`) and two LRP rule sets.
# Each `Attribution` shows itself as a heatmap in a notebook (red: supports mary, blue: supports john).

# %%
explanations = {rules: cage_lens.attribute(model, prompt, target=" mary", contrast=" john", rules=rules)
                for rules in ("gxi", "cplrp", "attnlrp")}
explanations["attnlrp"]

# %%
print(f"{'rules':8s} {'target':>8s} {'Σ tokens':>9s}   top tokens")
for rules, a in explanations.items():
    top = ", ".join(f"{t!r}@{i} {r:+.2f}" for i, t, r in a.top_tokens(3))
    print(f"{rules:8s} {float(a.target_value[0]):8.2f} {float(a.token_relevance[0].sum()):9.2f}   {top}")
# both LRP rule sets put the indirect object's name first; gradient × input does not
assert explanations["cplrp"].top_tokens(1)[0][:2] == explanations["attnlrp"].top_tokens(1)[0][:2] == (2, "mary")
assert explanations["gxi"].top_tokens(1)[0][:2] != (2, "mary")

# %% [markdown]
# ## 2. Conservation: where the explained value goes
# LRP splits the explained value backwards, layer by layer. What reaches the input tokens plus what
# the biases and (with AttnLRP) the softmax absorbed on the way is the target, exactly — the
# conservation report lists each part. Gradient × input has no such bookkeeping: its token sum is just
# some number.

# %%
cplrp = explanations["cplrp"]
print(cplrp.conservation.table())
for rules in ("cplrp", "attnlrp"):
    report = explanations[rules].conservation
    # float32 model: agreement to float32 rounding of a sum of ~10 terms
    assert torch.allclose(report.sums[:, 0] + report.absorbed.sum(-1), explanations[rules].target_value, rtol=1e-5, atol=1e-5)
gxi_sum = float(explanations["gxi"].token_relevance[0].sum())
print(f"gradient × input: Σ tokens = {gxi_sum:.2f} for a target of {float(cplrp.target_value[0]):.2f}")
assert abs(gxi_sum - float(cplrp.target_value[0])) > 5

# %% [markdown]
# ### Exercise 1 — predict, then check
# On a model **without biases**, CP-LRP conserves exactly: Σ input relevance (token and position
# embeddings) = target. Does gradient × input conserve on the same bias-free model? Predict `True` or
# `False`.

# %% tags=["exercise"]
my_prediction = None  # True or False

# %% tags=["solution"] jupyter={"source_hidden": true}
from cage_lens.testing import random_model

bias_free = random_model("gpt2", biases=False, dtype=torch.float64)
by_rules = {r: cage_lens.attribute(bias_free, "the cat sat on the mat", rules=r) for r in ("cplrp", "gxi")}
errors = {r: abs(float(a.input_relevance[0].sum() - a.target_value[0])) / abs(float(a.target_value[0]))
          for r, a in by_rules.items()}
answer = errors["gxi"] < 1e-9
print(f"relative conservation error: cplrp {errors['cplrp']:.1e}, gxi {errors['gxi']:.1e}")
assert errors["cplrp"] < 1e-12 and errors["gxi"] > 1e-3  # softmax, GELU and LayerNorm bend the slope
print("answer:", answer, "| your prediction:", my_prediction, "✓" if my_prediction == answer else "")

# %% [markdown]
# ## 3. Relevance against causal effect
# Activation patching asks a *counterfactual* question, so it needs a second prompt. The standard IOI
# corruption swaps the indirect object for a new name; here we compare, at every input token, the
# relevance of the clean run with the effect of restoring that token's embedding (layer-0 `resid_pre`)
# into the corrupted run — TransformerLens' own `get_act_patch_resid_pre`.

# %%
corrupted_prompt = prompt.replace("mary", "lucy")  # word-level vocabulary: swap whole words
corrupted = model.to_tokens(corrupted_prompt)


def logit_diff(logits):
    return logits[0, -1, MARY] - logits[0, -1, JOHN]


with torch.no_grad():
    _, clean_cache = model.run_with_cache(tokens)
    base = float(logit_diff(model(corrupted)))
effect = tl_patching.get_act_patch_resid_pre(model, corrupted, clean_cache, logit_diff) - base  # [layer, pos]
relevance = cplrp.token_relevance[0]
print(f"{'token':>8s} {'relevance':>10s} {'effect':>8s}")
for pos, tok in enumerate(model.to_str_tokens(tokens)):
    print(f"{tok:>8s} {float(relevance[pos]):+10.2f} {float(effect[0, pos]):+8.2f}")
# here they agree: only the swapped word has an effect, and it is the most relevant token
assert int(effect[0].abs().argmax()) == int(relevance.abs().argmax()) == 2

# %% [markdown]
# ## 4. When relevance disagrees with causal effect
# Relevance splits the value the model *computed*, along the paths it took. A token can matter
# causally without carrying any of that value: when it decides **where attention looks** rather than
# **what is moved**. CP-LRP holds the attention weights constant, so that route carries no relevance;
# a one-backward patching estimate built on it misses the effect too (`rules="cplrp"` below; the
# default of `cage_lens.patching`, routing-aware patching, measures it — tutorial 4).
#
# **The S2 swap (IOI).** Replace the second mention of the subject ("john gave") by the indirect
# object ("mary gave"): the model now answers "john". Restoring the S2 token flips the answer back —
# a huge causal effect — but the S2 token's own relevance is small, and the estimate of the patch
# even has the wrong sign: the S2 token tells the model *which* name is repeated (attention routing),
# it does not carry "mary" forwards.

# %%
s2 = 10
swapped = model.to_tokens(prompt.replace(", john gave", ", mary gave"))
with torch.no_grad():
    swapped_base = float(logit_diff(model(swapped)))
swap_effect = tl_patching.get_act_patch_resid_pre(model, swapped, clean_cache, logit_diff) - swapped_base
swap_estimate = patching.relevance_patch_resid_pre(model, swapped, clean_cache, logit_diff, rules="cplrp")  # one backward
print(f"metric: clean {float(logit_diff(model(tokens))):+.1f}, S2 swapped {swapped_base:+.1f}")
print(f"restore S2 at layer 0: activation patching {float(swap_effect[0, s2]):+.1f}, "
      f"relevance patching estimate {float(swap_estimate[0, s2]):+.1f}, S2's relevance {float(relevance[s2]):+.2f}")
assert swapped_base < 0 < float(swap_effect[0, s2]) - 20
assert float(swap_estimate[0, s2]) < 0.1 * float(swap_effect[0, s2])
assert abs(float(relevance[s2])) < 0.1 * float(relevance.abs().max())

# %% [markdown]
# **The pointer-chase start key.** In `c > i ; f > m ; i > n ; start c :` the model answers `i`, the
# value of the start key `c`. Change the start key to `f` and it answers `m`. The start key decides
# which fact is read (routing); the value token `i` of the fact carries the answer (content).

# %%
chase = zoo.load("pointer-chase")
chase_prompt = "c > i ; f > m ; i > n ; start c :"
chase_tokens, chase_corrupted = chase.to_tokens(chase_prompt), chase.to_tokens(chase_prompt.replace("start c", "start f"))
I_, M_ = (int(chase.to_tokens(w, prepend_bos=False)[0, 0]) for w in (" i", " m"))


def chase_metric(logits):
    return logits[0, -1, I_] - logits[0, -1, M_]


with torch.no_grad():
    _, chase_cache = chase.run_with_cache(chase_tokens)
    chase_base = float(chase_metric(chase(chase_corrupted)))
chase_effect = tl_patching.get_act_patch_resid_pre(chase, chase_corrupted, chase_cache, chase_metric) - chase_base
chase_estimate = patching.relevance_patch_resid_pre(chase, chase_corrupted, chase_cache, chase_metric, rules="cplrp")
chase_relevance = cage_lens.attribute(chase, chase_prompt, target=" i", contrast=" m", rules="attnlrp")
start, value = 14, 3  # the start key and the value token 'i' of the fact 'c > i'
print(f"start key: causal effect {float(chase_effect[0, start]):+.1f}, estimate {float(chase_estimate[0, start]):+.2f}, "
      f"relevance {float(chase_relevance.token_relevance[0, start]):+.2f}; "
      f"value token: relevance {float(chase_relevance.token_relevance[0, value]):+.2f}")
chase_relevance

# %% [markdown]
# ### Exercise 2 — predict, then check
# Restore the start key one layer later (layer 2 `resid_pre` instead of layer 0). The causal effect
# stays the same. Will the one-backward estimate at layer 2 still miss it (below 10 % of the effect)?
# Predict `True` (still misses) or `False` (gets most of it).

# %% tags=["exercise"]
my_prediction = None  # True or False

# %% tags=["solution"] jupyter={"source_hidden": true}
layer0 = float(chase_estimate[0, start]) / float(chase_effect[0, start])
layer2 = float(chase_estimate[2, start]) / float(chase_effect[2, start])
answer = layer2 < 0.1
print(f"estimate ÷ effect at the start key: layer 0 {layer0:.2f}, layer 2 {layer2:.2f}")
# by layer 2 the routing has happened in the earlier layers' attention: what is left at the start key is
# content that flows linearly, and the estimate recovers most of the effect
assert layer0 < 0.1 < 0.5 < layer2
assert abs(float(chase_effect[2, start]) - float(chase_effect[0, start])) < 1
print("answer:", answer, "| your prediction:", my_prediction, "✓" if my_prediction == answer else "")

# %% [markdown]
# ## What to take away
# - **Gradient × input** is a slope; it does not add up to the output and can rank tokens oddly.
# - **Relevance** adds up (conservation) and says what the computed value is made of — it is not a
#   counterfactual.
# - **Activation patching** is the counterfactual; it needs a second prompt and a forward per cell.
# - They disagree exactly where a token acts through **attention routing** (the S2 token, the start
#   key). Tutorial 4 shows relevance patching next to activation patching on whole grids, and where the
#   one-backward estimate needs attention-aware treatment.
