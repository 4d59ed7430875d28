# %% [markdown]
# # Tutorial 2 — why did the model answer wrongly? Contrastive failure analysis across checkpoints
#
# The IOI zoo model ships with intermediate training checkpoints. Early checkpoints still fail on
# many prompts: they name the repeated subject ("bob") instead of the indirect object ("lucy").
# We explain each failure as `Δℓ = logit(wrong) − logit(correct)` (Tan et al. 2026; docs/failure.md), then
# aggregate over failures and compare the early checkpoint with the final model.
# Runs offline: `python tutorials/02_failure_analysis.py`.

# %%
import torch

import cage_lens
from cage_lens import zoo

steps = [r["checkpoints"] for r in zoo.list() if r["name"] == "ioi" and r["default"]][0]
early = zoo.load("ioi", checkpoint=steps[0])
final = zoo.load("ioi")
samples = zoo.task("ioi").sample(120, seed=2026)
print("checkpoints:", steps)


def prediction(model, prompt):
    with torch.no_grad():
        return int(model(model.to_tokens(prompt))[0, -1].argmax())


def failures(model):
    out = []
    for s in samples:
        if prediction(model, s.prompt) != model.to_tokens(" " + s.correct, prepend_bos=False)[0, 0]:
            out.append(s)
    return out


early_failures = failures(early)
final_failures = failures(final)
print(f"step {steps[0]}: {len(early_failures)}/{len(samples)} wrong;  final: {len(final_failures)}/{len(samples)} wrong")
assert len(early_failures) >= 20 and len(final_failures) < len(early_failures)  # training fixed most of them

# %% [markdown]
# ## One failure, explained
# `explain_failure` takes the prompt, the correct token (and optionally the wrong one; by default
# the model's own top-1). It returns Δℓ, a heatmap normalised by max |R| over non-special tokens
# (BOS is excluded: it acts as an attention sink), the layer × token trace and a pruned cross-layer
# attribution graph. Positive relevance pushes towards the wrong token.

# %%
case = early_failures[0]
explanation = cage_lens.explain_failure(early, case.prompt, correct=" " + case.correct)
print(case.prompt, "| correct:", case.correct)
print(explanation)
assert explanation.delta > 0  # a failure: the wrong token's logit is above the correct one's
shown = [i for i in range(len(explanation.heatmap)) if i not in explanation.excluded]
assert explanation.heatmap[shown].abs().max() == 1  # divided by max |R| over the non-special tokens

# %% [markdown]
# ## Aggregated over failures: where does the wrong answer come from?
# For each failure we sum the relevance (in logit units) on the indirect-object name, on the subject
# names and on everything else. Then we explain the *same prompts* with the final model, contrasting
# the same wrong name against the correct one.

# %%
def relevance_by_role(model, cases):
    shares = []
    for s in cases:
        a = cage_lens.attribute(model, s.prompt, target=" " + s.wrong, contrast=" " + s.correct)
        r = a.input_relevance[0]
        io = r[s.meta["io_positions"]].sum()
        subj = r[s.meta["s_positions"]].sum()
        shares.append(torch.stack([a.target_value[0], io, subj, r.sum() - io - subj]))
    return torch.stack(shares).mean(0) if shares else torch.zeros(4)


cases = early_failures[:20]
by_role = {}
for name, model in (("early", early), ("final", final)):
    by_role[name] = delta, io, subj, rest = relevance_by_role(model, cases).tolist()
    print(f"{name:5s} mean Δℓ {delta:+7.3f} | relevance on IO name {io:+7.3f}, subject names {subj:+7.3f}, other {rest:+7.3f}")
# the early checkpoint prefers the wrong name on these prompts, the final model the correct one, and the
# IO name argues for the correct answer far more strongly in the final model
assert by_role["early"][0] > 0 > by_role["final"][0]
assert by_role["final"][1] < by_role["early"][1] < 0

# %% [markdown]
# Read it like this: negative relevance on the IO name means the name *argues for the correct
# answer*; positive relevance on the subject names means they argue for the wrong one. Compare the
# two rows: how much of the change from a positive Δℓ (failure) to a negative one comes from the
# IO name gaining weight, and how much from the subject names losing it? (Tan et al. report that
# real-benchmark failures are dominated by under-weighting the relevant tokens.)
