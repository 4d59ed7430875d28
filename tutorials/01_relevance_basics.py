# %% [markdown]
# # Tutorial 1 — token and node relevance with LRP
#
# Runs offline on the shipped IOI model (a 3-layer GPT-2-architecture model trained on
# indirect-object-identification prompts). Run it as a script (`python tutorials/01_relevance_basics.py`)
# or open it in Jupyter/VS Code: every `# %%` starts a cell.
#
# What you learn: how `cage_lens.attribute` explains a (contrastive) prediction, what the
# conservation report tells you, how the LRP rules compose with ordinary TransformerLens workflows,
# and which heads carry the relevance.

# %%
import torch

import cage_lens
from cage_lens import zoo

model = zoo.load("ioi")
prompt = "when mary and john went to the store , john gave a drink to"
print(cage_lens.adapt(model).arch.describe())
print("prediction:", model.to_string(model(model.to_tokens(prompt))[0, -1].argmax()))

# %% [markdown]
# ## 1. A contrastive explanation
# The IOI task: the answer is the name that appears once (the *indirect object*, "mary"), not the
# repeated subject ("john"). Explaining `logit(mary) − logit(john)` isolates what makes the model
# prefer the right name over the tempting wrong one.

# %%
attr = cage_lens.attribute(model, prompt, target=" mary", contrast=" john", rules="attnlrp")
print(attr)
# in a terminal, print(attr.show()) renders an ANSI heatmap; in a notebook, `attr` alone shows one
for pos, tok, rel in attr.top_tokens(5):
    print(f"{pos:>3} {tok!r:>10} {rel:+.3f}")

# %% [markdown]
# ## 2. Conservation: where does the relevance go?
# LRP redistributes the explained value layer by layer. With CP-LRP on a model without biases the
# sum over tokens is *exactly* the target at every layer; biases and AttnLRP's softmax absorb part of
# it, and the report says how much.

# %%
for rules in ("cplrp", "attnlrp", "gxi"):
    a = cage_lens.attribute(model, prompt, target=" mary", contrast=" john", rules=rules)
    print(f"{rules:8s} target {float(a.target_value[0]):7.3f}   reaches the input: "
          f"{float(a.conservation.input_share()[0]):6.3f}")
print(attr.conservation.table())

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
    return hook

with cage_lens.lrp(model, "attnlrp"), model.hooks(fwd_hooks=[("blocks.1.hook_resid_post", keep("r"))]):
    logits = model(tokens)
    target = logits[0, -1, attr.target_ids[0]] - logits[0, -1, attr.contrast_ids[0]]
    (grad,) = torch.autograd.grad(target, stored["r"])
by_hand = (stored["r"] * grad).sum(-1)[0]
print("by hand == attribute():", torch.allclose(by_hand, attr.node_relevance["blocks.1.hook_resid_post"][0], atol=1e-5))

# %% [markdown]
# ## 4. Which heads matter?
# `head_relevance[batch, layer, head, pos]` is the relevance of each head's output (`hook_z`).

# %%
per_head = attr.head_relevance[0].sum(-1)  # [layer, head]
for layer, row in enumerate(per_head.tolist()):
    print(f"layer {layer}: " + "  ".join(f"h{h} {v:+.2f}" for h, v in enumerate(row)))
