# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Tutorial 1 — token and node relevance with LRP
#
# Runs offline on the shipped IOI model (a 3-layer GPT-2-architecture model trained on
# indirect-object-identification prompts). Open the notebook (`tutorials/01_relevance_basics.ipynb`) in
# Jupyter or VS Code; the `.py` beside it is the same tutorial in percent cells (`jupytext --sync`
# keeps the two in step). Exercises: *predict, then check* — the solutions are folded under each one.
#
# What you learn: how `cage_lens.attribute` explains a (contrastive) prediction, what the
# conservation report tells you, how the LRP rules compose with ordinary TransformerLens workflows,
# and which heads carry the relevance.

# %%
# %matplotlib inline
import torch

import cage_lens
from cage_lens import zoo

model = zoo.load("ioi")
prompt = "when mary and john went to the store , john gave a drink to"
print(cage_lens.adapt(model).arch.describe())
prediction = model.to_string(model(model.to_tokens(prompt))[0, -1].argmax())
print("prediction:", prediction)
assert prediction == "mary"  # the indirect object: the trained model solves this prompt

# %% [markdown]
# ## 1. A contrastive explanation
# The IOI task: the answer is the name that appears once (the *indirect object*, "mary"), not the
# repeated subject ("john"). Explaining `logit(mary) − logit(john)` isolates what makes the model
# prefer the right name over the tempting wrong one.

# %%
attr = cage_lens.attribute(model, prompt, target=" mary", contrast=" john", rules="attnlrp")
print(attr)
for pos, tok, rel in attr.top_tokens(5):
    print(f"{pos:>3} {tok!r:>10} {rel:+.3f}")
# the indirect object's own name carries the largest relevance, and it argues *for* mary
assert attr.top_tokens(1)[0][:2] == (2, "mary") and attr.top_tokens(1)[0][2] > 0
attr  # in a notebook: the heatmap (in a terminal, print(attr.show()) draws it in ANSI colours)

# %% [markdown]
# The same relevance as a figure: the token heatmap on top, and below it the relevance of every token at
# every residual point, from the embeddings (top row) to the last layer.

# %%
attr.plot()

# %% [markdown]
# ### Exercise 1 — predict, then check
# Which input token argues hardest **for john** (the most negative relevance)? Predict its position
# (count from 0; `<bos>` is position 0).

# %% tags=["exercise"]
my_prediction = None  # a position, e.g. 10

# %% tags=["solution"] jupyter={"source_hidden": true}
answer = int(attr.token_relevance[0].argmin())
print(f"most negative: {attr.str_tokens[0][answer]!r}@{answer} {float(attr.token_relevance[0, answer]):+.2f}")
# the first mention of the subject: the model uses "john ... john" to know which name NOT to say, and the
# first "john" is what the duplicate is matched against
assert answer == 4 and attr.str_tokens[0][answer] == "john"
print("answer:", answer, "| your prediction:", my_prediction, "✓" if my_prediction == answer else "")

# %% [markdown]
# ## 2. Conservation: where does the relevance go?
# LRP redistributes the explained value layer by layer. With CP-LRP on a model without biases the
# sum over tokens is *exactly* the target at every layer; biases and AttnLRP's softmax absorb part of
# it, and the report says how much.

# %%
for rules in ("cplrp", "attnlrp", "gxi"):
    a = cage_lens.attribute(model, prompt, target=" mary", contrast=" john", rules=rules)
    report = a.conservation
    print(f"{rules:8s} target {float(a.target_value[0]):7.3f}   reaches the input: "
          f"{float(report.input_share()[0]):6.3f}")
    # nothing disappears unreported: what reaches the input plus everything absorbed is the target
    # (float32 model: agreement to float32 rounding of a sum of ~10 terms)
    assert torch.allclose(report.sums[:, 0] + report.absorbed.sum(-1), a.target_value, rtol=1e-5, atol=1e-5)
print(attr.conservation.table())

# The exact case: CP-LRP on a random bias-free model (float64) conserves at every residual point.
from cage_lens.testing import random_model

bias_free = random_model("gpt2", biases=False, dtype=torch.float64)
exact = cage_lens.attribute(bias_free, "the cat sat on the mat", rules="cplrp")
print("bias-free model, CP-LRP: largest relative conservation error", exact.conservation.max_error())
assert exact.conservation.max_error() < 1e-12

# %% [markdown]
# ## 3. The rules inside any TransformerLens workflow
# `cage_lens.lrp` installs the rules as hooks for the duration of a `with` block. Forward values are
# unchanged; gradients follow the LRP rules, so `activation * activation.grad` *is* the relevance.

# %%
tokens = model.to_tokens(prompt)
stored = {}

def keep(name):
    def hook(t, hook):
        stored[name] = t
        return t  # returned: on a TransformerBridge, reshaped hook points (hook_z) join the graph only then
    return hook

with cage_lens.lrp(model, "attnlrp"), model.hooks(fwd_hooks=[("blocks.1.hook_resid_post", keep("r"))]):
    logits = model(tokens)
    target = logits[0, -1, attr.target_ids[0]] - logits[0, -1, attr.contrast_ids[0]]
    (grad,) = torch.autograd.grad(target, stored["r"])
by_hand = (stored["r"] * grad).sum(-1)[0]
same = torch.allclose(by_hand, attr.node_relevance["blocks.1.hook_resid_post"][0], rtol=1e-5, atol=1e-5)
print("by hand == attribute():", same)
assert same  # float32 model: the two backward passes may sum in a different order
with torch.no_grad():
    assert torch.equal(logits.detach(), model(tokens))  # the rules leave forward values untouched

# %% [markdown]
# ## 4. Which heads matter?
# `head_relevance[batch, layer, head, pos]` is the relevance of each head's output (`hook_z`).

# %%
per_head = attr.head_relevance[0].sum(-1)  # [layer, head]
for layer, row in enumerate(per_head.tolist()):
    print(f"layer {layer}: " + "  ".join(f"h{h} {v:+.2f}" for h, v in enumerate(row)))

# The same by hand: z ⊙ ∂target/∂z at every layer's hook_z, summed over d_head and positions.
zs = {}
with cage_lens.lrp(model, "attnlrp"), model.hooks(
    fwd_hooks=[(f"blocks.{l}.attn.hook_z", keep(l)) for l in range(model.cfg.n_layers)]
):
    logits = model(tokens)
    target = logits[0, -1, attr.target_ids[0]] - logits[0, -1, attr.contrast_ids[0]]
    grads = torch.autograd.grad(target, [stored[l] for l in range(model.cfg.n_layers)])
by_hand = torch.stack([(stored[l] * g).sum((-1, 1))[0] for l, g in enumerate(grads)])  # [layer, head]
assert torch.allclose(by_hand, per_head, rtol=1e-5, atol=1e-5)  # float32, as above

# %% [markdown]
# ### Exercise 2 — predict, then check
# Heads in every layer carry relevance. Will the **most relevant head** (largest |relevance|) be in the
# first, the middle or the last layer? Predict its layer (0, 1 or 2).

# %% tags=["exercise"]
my_prediction = None  # 0, 1 or 2

# %% tags=["solution"] jupyter={"source_hidden": true}
answer = int(per_head.abs().argmax()) // model.cfg.n_heads
print("per layer Σ|head relevance|:", [round(v, 2) for v in per_head.abs().sum(-1).tolist()])
# the strongest single head sits in the last layer, yet layer 0 holds the most relevance in total: many
# early heads each pass a share on, one late head finishes the job
assert answer == model.cfg.n_layers - 1 and int(per_head.abs().sum(-1).argmax()) == 0
print("answer:", answer, "| your prediction:", my_prediction, "✓" if my_prediction == answer else "")
