# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Tutorial 4 — relevance patching next to activation patching
#
# Activation patching (TransformerLens' `patching.get_act_patch_*`) runs one forward per patched
# cell. Attribution patching estimates every cell at once from a gradient; relevance patching (RelP)
# takes that gradient under LRP rules. `cage_lens.patching` has the same function names, arguments
# and grid shapes as `transformer_lens.patching`, so switching is one call.
#
# Runs offline on the shipped IOI model in about a minute. What you learn: how to read the three
# grids side by side, how well they agree (both patching directions), why attribution patching
# breaks down in the noising direction while relevance patching does not, and — with
# TransformerLens' own IOI corruption, the S2 swap — why every one-backward estimate goes wrong when
# a corruption changes *where attention looks*, and how `cage_lens.patching`'s default
# (routing-aware patching) gets it right.

# %%
# %matplotlib inline
import os

os.environ.setdefault("TQDM_DISABLE", "1")  # TransformerLens' sweeps draw a progress bar per grid

import torch
import transformer_lens.patching as tl_patching

from cage_lens import patching, zoo

torch.set_num_threads(2)
model = zoo.load("ioi")
task = zoo.task("ioi")

# eight prompts of one template (a patching batch must have one token length), each with its
# corruption: the indirect object replaced by a name that is not in the prompt
samples = [s for s in task.sample(200, seed=1) if s.meta["template"] == 0][:8]
pairs = [task.corrupt(s) for s in samples]
print(pairs[0].clean, "->", pairs[0].answer)
print(pairs[0].corrupted, "->", pairs[0].corrupted_answer)


def token(word):
    return int(model.to_tokens(word, prepend_bos=False)[0, 0])


clean_tokens = model.to_tokens([p.clean for p in pairs])
corrupted_tokens = model.to_tokens([p.corrupted for p in pairs])
io = torch.tensor([token(p.answer) for p in pairs])
s = torch.tensor([token(p.contrast) for p in pairs])
rows = torch.arange(len(pairs))


def logit_diff(logits):
    """TransformerLens' patching contract: logits -> scalar (mean logit(IO) − logit(S))."""
    return (logits[rows, -1, io] - logits[rows, -1, s]).mean()


with torch.no_grad():
    clean_logits, clean_cache = model.run_with_cache(clean_tokens)
    corrupted_logits, corrupted_cache = model.run_with_cache(corrupted_tokens)
print(f"logit diff: clean {float(logit_diff(clean_logits)):+.2f}, corrupted {float(logit_diff(corrupted_logits)):+.2f}")

# %% [markdown]
# ## 1. Three head grids: activation, relevance and attribution patching
# TL's grid holds the patched metric; the estimates hold the *change* it makes, so subtract the
# corrupted run's metric from TL's grid before comparing numbers. Sections 1–4 use the one-backward
# estimates — `rules="cplrp"` (relevance patching) and `rules="gxi"` (attribution patching): one forward
# and one backward give every cell. Section 5 turns to the default method.

# %%
base = float(logit_diff(corrupted_logits))
activation = tl_patching.get_act_patch_attn_head_out_all_pos(model, corrupted_tokens, clean_cache, logit_diff) - base
relevance = patching.relevance_patch_attn_head_out_all_pos(model, corrupted_tokens, clean_cache, logit_diff, rules="cplrp")
attribution = patching.relevance_patch_attn_head_out_all_pos(model, corrupted_tokens, clean_cache, logit_diff, rules="gxi")


def text_heatmap(name, grid):
    shades = " ░▒▓█"
    scale = float(grid.abs().max())
    print(f"{name}  (max |effect| {scale:.2f}; shade = |effect|, sign shown)")
    for layer, row in enumerate(grid.tolist()):
        cells = "  ".join(f"{'+' if v >= 0 else '-'}{shades[min(4, int(4 * abs(v) / scale + 0.5))] * 3}{v:+6.2f}" for v in row)
        print(f"  L{layer}  {cells}")


for name, grid in (("activation patching", activation), ("relevance patching (cplrp)", relevance),
                   ("attribution patching (gxi)", attribution)):
    text_heatmap(name, grid)

top_activation = int(activation.abs().argmax())
assert int(relevance.abs().argmax()) == top_activation == int(attribution.abs().argmax())
print("all three put the largest effect on head", f"L{top_activation // model.cfg.n_heads}H{top_activation % model.cfg.n_heads}")

# %% [markdown]
# ## 2. Agreement, measured, in both directions
# `patching.agreement` runs TL's activation patching and the estimates on the same grids, prompts and
# metric; its inputs are keywords in TL's order (corrupted first). *Denoising* (TL's direction) patches
# clean activations into the corrupted run; *noising* patches corrupted activations into the clean run.

# %%
grids = ("resid_pre", "attn_head_out_all_pos")
results = {
    direction: patching.agreement(model, corrupted_tokens=corrupted_tokens, clean_tokens=clean_tokens,
                                  metric=logit_diff, grids=grids, rules=("cplrp", "gxi"), direction=direction)
    for direction in ("denoising", "noising")
}
for result in results.values():
    print(result.table(), "\n")

for direction, result in results.items():
    for grid in grids:
        assert result.pearson("cplrp", grid) > 0.95, (direction, grid)
noising = results["noising"]
assert noising.pearson("gxi", "resid_pre") < 0.5 and noising.pearson("gxi", "attn_head_out_all_pos") < 0.5

try:
    import matplotlib  # noqa: F401

    noising.scatter("resid_pre")  # estimate vs activation-patching effect, one colour per rule set (inline)
except ImportError:
    print("matplotlib is not installed: no scatter plot (the tables above carry the same numbers)")

# %% [markdown]
# ### Exercise 1 — predict, then check
# In the *denoising* direction, which estimate agrees better with activation patching on the head grid:
# relevance patching (`"cplrp"`) or attribution patching (`"gxi"`)? Predict one.

# %% tags=["exercise"]
my_prediction = None  # "cplrp" or "gxi"

# %% tags=["solution"] jupyter={"source_hidden": true}
denoising = results["denoising"]
scores = {r: denoising.pearson(r, "attn_head_out_all_pos") for r in ("cplrp", "gxi")}
answer = max(scores, key=scores.get)
print("Pearson with activation patching (denoising, heads):", {r: round(v, 3) for r, v in scores.items()})
assert scores["cplrp"] > 0.95 and answer in scores
print("answer:", answer, "| your prediction:", my_prediction, "✓" if my_prediction == answer else "")

# %% [markdown]
# ## 3. One disagreement, explained
# In the noising direction attribution patching misses the biggest cell of the residual grid: the
# IO name's own embedding (layer 0). Removing it costs ~16 logits; the gradient predicts almost
# nothing. The clean run is *saturated*: its final residual already points along the answer
# direction, and every LayerNorm's gradient removes the component along its own input, so "more (or
# less) of the same" looks flat to a local slope while the real patch removes a large chunk.
# The LRP rule for normalisation holds the scale constant; with only that rule switched on (plain
# gradients everywhere else) the estimate recovers.

# %%
position = pairs[0].position
cell = (0, position)
norm_only = patching.PatchRules("norm rule only", base="cplrp", mlp=False, attention=False)
norm_grid = patching.relevance_patch_resid_pre(model, clean_tokens, corrupted_cache, logit_diff, rules=norm_only)
effect = float(noising.activation["resid_pre"][cell])
print(f"resid_pre L0 at the IO position: activation patching {effect:+.2f}, "
      f"attribution patching {float(noising.estimates['gxi']['resid_pre'][cell]):+.2f}, "
      f"relevance patching {float(noising.estimates['cplrp']['resid_pre'][cell]):+.2f}, "
      f"norm rule only {float(norm_grid[cell]):+.2f}")
assert abs(float(noising.estimates["gxi"]["resid_pre"][cell])) < 0.1 * abs(effect)
assert abs(float(noising.estimates["cplrp"]["resid_pre"][cell]) - effect) < 0.2 * abs(effect)
norm_pearson = patching.pearson(norm_grid, noising.activation["resid_pre"])
print(f"Pearson on the noising resid_pre grid: gxi {noising.pearson('gxi', 'resid_pre'):.3f}, "
      f"norm rule only {norm_pearson:.3f}, cplrp {noising.pearson('cplrp', 'resid_pre'):.3f}")
assert norm_pearson > 0.95

# %% [markdown]
# ## 4. The same numbers from an `Attribution`
# `cage_lens.attribute` gives relevance of every node for one target; its views use TL's axis order
# (`stack("resid_pre")` is `[batch, layer, pos]`, `head_grid()` is `[batch, layer, pos, head]`, labels
# like `stack_head_results`). Patching every activation to zero moves the metric by −relevance to
# first order, so relevance *is* a zero-ablation patching estimate.

# %%
import cage_lens

attr = cage_lens.attribute(model, pairs[0].clean, target=" " + pairs[0].answer, contrast=" " + pairs[0].contrast,
                           rules="cplrp")
per_head = attr.head_grid(by_pos=False)[0]
best = int(per_head.abs().argmax())
print("most relevant head for the first prompt:", attr.head_labels[best], f"{float(per_head.flatten()[best]):+.2f}")
print("resid_pre relevance, [layer, pos]:", tuple(attr.stack("resid_pre")[0].shape))

# %% [markdown]
# ## 5. The S2 swap: when the effect travels through attention routing
# TransformerLens' and ARENA's IOI demos corrupt differently: the *second* mention of the subject (S2)
# becomes the indirect object's name, so the other name is now the repeated one and the answer flips.
# The S2 token does not carry a name to the answer; it decides **which name the name-mover heads read**
# — where attention looks. Patch the layer-0 S2 cell back and the answer flips back: a large effect.
# A one-backward estimate reads that effect off one gradient — and the switched attention rows sit on
# a saturated softmax (p ≈ 1 → p ≈ 0), whose gradient is ~0; CP-LRP even holds patterns constant by
# design. So the estimate misses the most important cell of the grid, sign included.

# %%
swapped = [task.corrupt(s_, swap="s2") for s_ in samples]
swap_tokens = model.to_tokens([p.corrupted for p in swapped])
s2 = swapped[0].position
with torch.no_grad():
    swap_base = float(logit_diff(model(swap_tokens)))
exact = tl_patching.get_act_patch_resid_pre(model, swap_tokens, clean_cache, logit_diff) - swap_base
one_backward = patching.relevance_patch_resid_pre(model, swap_tokens, clean_cache, logit_diff, rules="cplrp")
attribution_s2 = patching.relevance_patch_resid_pre(model, swap_tokens, clean_cache, logit_diff, rules="gxi")
print(f"S2 swapped: logit diff {swap_base:+.2f} (clean {float(logit_diff(clean_logits)):+.2f})")
print(f"restore S2 at layer 0: activation patching {float(exact[0, s2]):+.2f}, relevance patching (CP-LRP) "
      f"{float(one_backward[0, s2]):+.2f}, attribution patching {float(attribution_s2[0, s2]):+.2f}")
assert float(exact[0, s2]) > 10 and abs(float(one_backward[0, s2])) < 0.1 * float(exact[0, s2])
print(f"Pearson on the resid_pre grid: CP-LRP {patching.pearson(one_backward, exact):.3f}, "
      f"AtP {patching.pearson(attribution_s2, exact):.3f}")

# %% [markdown]
# **Why: routing, not value.** Compare where a last-layer head at the final position looks in the two
# runs: the whole row moves from one key to another, and sits on a saturated softmax in both.

# %%
with torch.no_grad():
    _, swap_cache = model.run_with_cache(swap_tokens)
last = model.cfg.n_layers - 1
clean_row = clean_cache[f"blocks.{last}.attn.hook_pattern"][0, :, -1]  # [head, key]
swap_row = swap_cache[f"blocks.{last}.attn.hook_pattern"][0, :, -1]
switch = (clean_row - swap_row).abs().sum(-1) / 2  # total variation of each head's row
head = int(switch.argmax())
top = float(swap_row[head].max())
print(f"L{last}H{head} at the last position: total variation {float(switch[head]):.2f} between the runs; "
      f"top probability {top:.3f}, p(1 − p) = {top * (1 - top):.4f} (the softmax's gradient ~ that)")
assert float(switch[head]) > 0.5 and top * (1 - top) < 0.05

# %% [markdown]
# **The fix: routing-aware patching, the default.** `relevance_patch` (and every `relevance_patch_*`)
# computes cells exactly by *suffix patching* — re-running only the rows and layers a patch can change,
# from the patched run's own key/value cache — as far as a budget allows, and estimates the rest with
# the patched row's trajectory computed exactly and every later row's attention re-softmaxed with the
# row's new key. The S2 swap sits late in the prompt, so most cells come out exact, at a tenth of TL's
# forwards (on a `HookedTransformer` every cell; a `TransformerBridge` runs every layer for every cell,
# so the same budget buys fewer). The result says what it did, and the flags say where a one-backward
# estimate goes wrong.

# %%
rap = patching.relevance_patch(model, swap_tokens, clean_cache, logit_diff, ["resid_pre", "attn_head_out_all_pos"])
print(rap.summary())
print(f"restore S2 at layer 0: routing-aware patching {float(rap['resid_pre'][0, s2]):+.2f} "
      f"(activation patching {float(exact[0, s2]):+.2f}); Pearson {patching.pearson(rap['resid_pre'], exact):.3f}")
assert rap.exact["resid_pre"][0, s2] and patching.pearson(rap["resid_pre"], exact) > 0.99
assert abs(float(rap["resid_pre"][0, s2]) - float(exact[0, s2])) < 1e-3 * abs(float(exact[0, s2]))
assert rap.total_cost <= rap.tl_forwards / 10 + 1e-9

# with a budget too small for exact patching, the estimates and their flags
estimate = patching.relevance_patch(model, swap_tokens, clean_cache, logit_diff, "resid_pre", budget=1e-3)
flags = estimate.flags["resid_pre"]
print(f"estimate only ({estimate.total_cost:.1f} forward-equivalents): S2 cell {float(estimate['resid_pre'][0, s2]):+.2f}, "
      f"flags there: {[name for name, mask in flags.items() if mask[0, s2]]}; Pearson "
      f"{patching.pearson(estimate['resid_pre'], exact):.3f}")
assert flags["saturated_switch"][0, s2] and flags["disagree"][0, s2]
assert patching.pearson(estimate["resid_pre"], exact) > 0.95 > patching.pearson(one_backward, exact)

# %% [markdown]
# ### Exercise 2 — predict, then check
# In the pointer-chase task (`c > i ; f > m ; i > n ; start c :`) the start key decides which fact a
# layer-1 head reads. Changing it is a routing corruption. Will the one-backward estimate (CP-LRP) of the
# start key's layer-0 cell be close to activation patching, or far from it? Predict `"close"` or `"far"`.

# %% tags=["exercise"]
my_prediction = None  # "close" or "far"

# %% tags=["solution"] jupyter={"source_hidden": true}
chase, chase_task = zoo.load("pointer-chase"), zoo.task("pointer-chase")
chase_pair = chase_task.corrupt(chase_task.sample(1, seed=0)[0])
i_, m_ = (int(chase.to_tokens(" " + w, prepend_bos=False)[0, 0]) for w in (chase_pair.answer, chase_pair.contrast))


def chase_metric(logits):
    return (logits[:, -1, i_] - logits[:, -1, m_]).mean()


with torch.no_grad():
    _, chase_cache = chase.run_with_cache(chase.to_tokens(chase_pair.clean))
chase_tokens = chase.to_tokens(chase_pair.corrupted)
key = (0, chase_pair.position)
truth = patching.relevance_patch(chase, chase_tokens, chase_cache, chase_metric, "resid_pre", method="exact")["resid_pre"]
guess = patching.relevance_patch(chase, chase_tokens, chase_cache, chase_metric, "resid_pre", rules="cplrp")["resid_pre"]
answer = "close" if abs(float(guess[key] - truth[key])) < 0.2 * abs(float(truth[key])) else "far"
print(f"start key, layer 0: activation patching {float(truth[key]):+.2f}, CP-LRP {float(guess[key]):+.2f}")
assert answer == "far"
print("answer:", answer, "| your prediction:", my_prediction, "✓" if my_prediction == answer else "")
