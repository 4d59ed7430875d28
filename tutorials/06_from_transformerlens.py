# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Tutorial 6 — from the TransformerLens course to relevance: DLA, logit lens, attention patterns
#
# If you know the TransformerLens exercises on IOI, you know three tools: **direct logit attribution**
# (DLA: each head's output projected on the logit-difference direction), the **logit lens** (the
# residual stream read through the unembedding after every layer) and **attention patterns**. This
# notebook puts each one next to the relevance view of the same model, on the zoo's IOI model,
# offline, with TransformerLens' own cache functions — so you can see what is the same and what is new.
#
# Exercises: *predict, then check* (solutions folded under each exercise).

# %%
# %matplotlib inline
import torch

import cage_lens
from cage_lens import zoo

torch.set_num_threads(2)
model = zoo.load("ioi")
prompt = "when mary and john went to the store , john gave a drink to"
tokens = model.to_tokens(prompt)
MARY, JOHN = (int(model.to_tokens(w, prepend_bos=False)[0, 0]) for w in (" mary", " john"))
with torch.no_grad():
    logits, cache = model.run_with_cache(tokens)
logit_diff = float(logits[0, -1, MARY] - logits[0, -1, JOHN])
direction = model.tokens_to_residual_directions(MARY) - model.tokens_to_residual_directions(JOHN)
print(f"logit(mary) − logit(john) = {logit_diff:.2f}")

# %% [markdown]
# ## 1. Direct logit attribution beside head relevance
# DLA (TransformerLens course): stack every head's output at the last position, apply the final
# LayerNorm's scale (`apply_ln_to_stack`), project on `W_U[:, mary] − W_U[:, john]`. It counts only the
# head's **direct** path to the logits. Head relevance (`Attribution.head_grid`) counts **every** path:
# what a head writes that later heads read is credited to it as well.

# %%
heads, labels = cache.stack_head_results(layer=-1, pos_slice=-1, return_labels=True)
dla = (cache.apply_ln_to_stack(heads, layer=-1, pos_slice=-1)[:, 0] @ direction).reshape(model.cfg.n_layers, -1)
attr = cage_lens.attribute(model, prompt, target=" mary", contrast=" john", rules="cplrp")
relevance = attr.head_grid(by_pos=False)[0]  # [layer, head], summed over positions
print(f"{'head':6s} {'DLA':>7s} {'relevance':>10s}")
for layer in range(model.cfg.n_layers):
    for head in range(model.cfg.n_heads):
        print(f"L{layer}H{head}  {float(dla[layer, head]):+7.2f} {float(relevance[layer, head]):+10.2f}")
# in the last layer a head's only path to the logits is the direct one: the two views agree on the ranking
last = model.cfg.n_layers - 1
assert int(dla[last].argmax()) == int(relevance[last].argmax())

# %% [markdown]
# ### Exercise 1 — predict, then check
# Layer-0 heads have almost no direct path to the answer. Will their **relevance** also be small
# compared with the last layer's heads? Predict `True` (small, like DLA) or `False`.

# %% tags=["exercise"]
my_prediction = None  # True or False

# %% tags=["solution"] jupyter={"source_hidden": true}
early, late = float(relevance[0].abs().sum()), float(relevance[last].abs().sum())
early_dla, late_dla = float(dla[0].abs().sum()), float(dla[last].abs().sum())
answer = early < 0.25 * late
print(f"Σ|relevance|: layer 0 {early:.2f}, layer {last} {late:.2f};   Σ|DLA|: layer 0 {early_dla:.2f}, layer {last} {late_dla:.2f}")
# relevance credits layer-0 heads with what later layers do with their output (indirect paths)
assert early / late > 2 * early_dla / late_dla
print("answer:", answer, "| your prediction:", my_prediction, "✓" if my_prediction == answer else "")

# %% [markdown]
# ## 2. The logit lens beside relevance per layer
# Logit lens: read the accumulated residual stream at the last position through the final LayerNorm
# and the unembedding, after every layer. It says when the *answer* becomes readable at the last
# token. Relevance per residual point (`layer_trace`) says which *tokens* hold the explanation at each
# depth.

# %%
accumulated, points = cache.accumulated_resid(apply_ln=True, pos_slice=-1, return_labels=True)
lens = accumulated[:, 0] @ direction
for point, value in zip(points, lens.tolist()):
    print(f"logit lens after {point:>10s}: {value:+7.2f}")
assert abs(float(lens[-1]) - logit_diff) < 0.5  # the last read-out is the logit difference (no unembedding bias here)
names, trace = attr.layer_trace(0)
attr

# %% [markdown]
# The layer × token relevance makes the same story visible from the input side: at the input the
# relevance sits on "mary" (and against it on the first "john"); by the last layers it has moved to the
# last position, where the answer is read out.

# %%
fig = attr.plot()  # matplotlib (the 'plot' extra)
fig

# %%
first, final = trace[0], trace[-1]
print("most relevant position at the first point:", int(first.abs().argmax()), "| at the last point:", int(final.abs().argmax()))
assert int(first.abs().argmax()) == 2 and int(final.abs().argmax()) == tokens.shape[1] - 1

# %% [markdown]
# ## 3. Attention patterns beside the relevance graph
# Attention patterns say where a head *looks*; the head-level relevance graph says where relevance
# *flows*. A head can look at a token that contributes nothing (an attention sink such as BOS).
# With `circuitsvis` installed (`pip install circuitsvis`), `circuitsvis.attention.attention_patterns`
# draws them interactively; here matplotlib does.

# %%
layer, head = divmod(int(relevance.abs().argmax()), model.cfg.n_heads)
pattern = cache["pattern", layer][0, head]  # [query, key]
str_tokens = model.to_str_tokens(tokens)
try:
    import circuitsvis

    display_pattern = circuitsvis.attention.attention_patterns(tokens=str_tokens, attention=cache["pattern", layer][0])
except ImportError:
    from matplotlib.figure import Figure

    display_pattern = Figure(figsize=(5, 4.4), layout="constrained")
    ax = display_pattern.subplots()
    image = ax.imshow(pattern.numpy(), cmap="Greys", vmin=0, vmax=1)
    ax.set_xticks(range(len(str_tokens)), str_tokens, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(len(str_tokens)), str_tokens, fontsize=7)
    ax.set_title(f"L{layer}H{head} attention (rows: queries)", fontsize=9)
    display_pattern.colorbar(image, ax=ax, label="attention weight")
print(f"most relevant head: L{layer}H{head}; from the last position it attends most to "
      f"{str_tokens[int(pattern[-1].argmax())]!r} ({float(pattern[-1].max()):.2f})")
display_pattern

# %%
graph = cage_lens.circuit_graph(model, prompt, target=" mary", contrast=" john", levels="heads")
graph

# %% [markdown]
# ### Exercise 2 — predict, then check
# Does the last position's attention in the most relevant head point at the token the relevance says
# matters most ("mary", position 2)? Predict `True` or `False`.

# %% tags=["exercise"]
my_prediction = None  # True or False

# %% tags=["solution"] jupyter={"source_hidden": true}
looked_at = int(pattern[-1].argmax())
answer = looked_at == int(attr.token_relevance[0].abs().argmax())
print(f"L{layer}H{head} looks most at {str_tokens[looked_at]!r}@{looked_at}; the most relevant token is "
      f"{str_tokens[int(attr.token_relevance[0].abs().argmax())]!r}")
assert int(attr.token_relevance[0].abs().argmax()) == 2
print("answer:", answer, "| your prediction:", my_prediction, "✓" if my_prediction == answer else "")
