# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Tutorial 2 — why did the model answer wrongly? Contrastive failure analysis across checkpoints
#
# The IOI zoo model ships with intermediate training checkpoints. Early checkpoints still fail on
# many prompts: they name the repeated subject ("bob") instead of the indirect object ("lucy").
# We explain each failure as `Δℓ = logit(wrong) − logit(correct)` (Tan et al. 2026; docs/failure.md), then
# aggregate over failures and compare the early checkpoint with the final model.
# Runs offline. Exercises: *predict, then check* — the solutions are folded under each one.

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
def delta(model, s):
    """Δℓ = logit(the model's top-1) − logit(correct) at the end of the prompt."""
    with torch.no_grad():
        logits = model(model.to_tokens(s.prompt))[0, -1]
    return float(logits.max() - logits[model.to_tokens(" " + s.correct, prepend_bos=False)[0, 0]])


case = max(early_failures, key=lambda s: delta(early, s))  # the clearest failure
explanation = cage_lens.explain_failure(early, case.prompt, correct=" " + case.correct)
print(case.prompt, "| correct:", case.correct)
print(explanation)
assert explanation.delta > 1  # a real failure by the library's own rule: the wrong name wins by more than 1 logit
shown = [i for i in range(len(explanation.heatmap)) if i not in explanation.excluded]
assert explanation.heatmap[shown].abs().max() == 1  # divided by max |R| over the non-special tokens
explanation  # in a notebook: Δℓ, the heatmap, the layer trace and the pruned graph

# %% [markdown]
# ### Exercise 1 — predict, then check
# The wrong answer is the repeated subject. Which kind of token pushes hardest **towards the wrong
# name**: the indirect-object name, a mention of the subject, or something else? Predict `"io"`,
# `"subject"` or `"other"`.

# %% tags=["exercise"]
my_prediction = None  # "io", "subject" or "other"

# %% tags=["solution"] jupyter={"source_hidden": true}
top_position = explanation.top_tokens(1, sign=1)[0][0]
answer = ("io" if top_position in case.meta["io_positions"] else
          "subject" if top_position in case.meta["s_positions"] else "other")
print(f"top token towards the wrong name: {explanation.prompt_tokens[top_position]!r}@{top_position} -> {answer}")
assert answer == "subject"
print("answer:", answer, "| your prediction:", my_prediction, "✓" if my_prediction == answer else "")

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
# ### Exercise 2 — predict, then check
# On the same 20 prompts, does the final model's **subject-name** relevance still argue for the wrong
# name (positive), or has it turned to argue for the correct one (negative)? Predict `"positive"` or
# `"negative"`.

# %% tags=["exercise"]
my_prediction = None  # "positive" or "negative"

# %% tags=["solution"] jupyter={"source_hidden": true}
answer = "positive" if by_role["final"][2] > 0 else "negative"
print(f"subject-name relevance: early {by_role['early'][2]:+.3f}, final {by_role['final'][2]:+.3f}")
# still positive: the subject names keep arguing for the wrong name; the final model wins because the IO
# name argues for the correct one far harder (compare the IO column)
assert answer == "positive" and by_role["final"][1] < -2 * by_role["final"][2]
print("answer:", answer, "| your prediction:", my_prediction, "✓" if my_prediction == answer else "")

# %% [markdown]
# Read it like this: negative relevance on the IO name means the name *argues for the correct
# answer*; positive relevance on the subject names means they argue for the wrong one. Compare the
# two rows: how much of the change from a positive Δℓ (failure) to a negative one comes from the
# IO name gaining weight, and how much from the subject names losing it? (Tan et al. report that
# real-benchmark failures are dominated by under-weighting the relevant tokens.)
