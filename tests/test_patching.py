"""Relevance patching: numbers pinned against hand-rolled autograd, TransformerLens' own activation
patching (finite differences, an exactly linear model), the LRP rules taken by hand, and the
``Attribution`` views."""

from __future__ import annotations

import contextlib

import pytest
import torch

import cage_lens
from cage_lens.core import engine
from cage_lens import patching as RP
from cage_lens.errors import InputError
from cage_lens.loading import has_hooked_transformer
from cage_lens.core.hooks import PointHook
from cage_lens.core.realise import Realisation
from cage_lens.testing import tiny_tokenizer
from conftest import cached_model, hook_count

CLEAN = "the cat sat on the mat and the dog ran"
CORRUPTED = "the dog sat on the mat and the cat ran"
SHORT_CLEAN, SHORT_CORRUPTED = "the cat sat on", "the dog sat on"  # where TL's sweeps run (one forward per cell)
TARGET, CONTRAST = 21, 22  # two token ids of the tiny tokenizer


def metric(logits):
    return (logits[:, -1, TARGET] - logits[:, -1, CONTRAST]).mean()


def runs(model, clean=CLEAN, corrupted=CORRUPTED):
    clean_t, corrupted_t = model.to_tokens(clean), model.to_tokens(corrupted)
    with torch.no_grad():
        _, clean_cache = model.run_with_cache(clean_t)
    return clean_t, corrupted_t, clean_cache


# ---------------------------------------------------------------------------- hand-rolled references
def _reduce_by_hand(grid: str, delta_times_grad: torch.Tensor) -> torch.Tensor:
    """The grid's cell sums, written out per TransformerLens layout (independent of GRIDS.reduce)."""
    x = delta_times_grad
    if grid in ("resid_pre", "resid_mid", "attn_out", "mlp_out"):
        return torch.einsum("bpd->p", x)
    if grid.endswith("_all_pos") and "pattern" not in grid:
        return torch.einsum("bphd->h", x)
    if grid.endswith("_by_pos") and "pattern" not in grid:
        return torch.einsum("bphd->ph", x)
    return {"attn_head_pattern_all_pos": torch.einsum("bhqk->h", x),
            "attn_head_pattern_by_pos": torch.einsum("bhqk->hq", x),
            "attn_head_pattern_dest_src_pos": torch.einsum("bhqk->hqk", x)}[grid]


def hand_rolled(model, grids, context=contextlib.nullcontext) -> dict[str, torch.Tensor]:
    """Attribution patching the textbook way: record activations with forward hooks (registered
    before any rule hooks), one backward with autograd, (clean − corrupted) · grad."""
    clean_t, corrupted_t, clean_cache = runs(model)
    hooks = {RP.GRIDS[g].hook_name(layer) for g in grids for layer in range(model.cfg.n_layers)}
    kept = {}

    def keep(name):
        def hook(tensor, hook):
            # replacing the hook's output is what a patch does; the pattern under CP-LRP (q and k
            # detached) does not require grad but still has a gradient: make it a leaf
            kept[name] = tensor.clone() if tensor.requires_grad else tensor.detach().requires_grad_(True)
            return kept[name]
        return hook

    with model.hooks(fwd_hooks=[(n, keep(n)) for n in sorted(hooks)]), context():
        value = metric(model(corrupted_t))
        names = sorted(kept)
        grads = dict(zip(names, torch.autograd.grad(value, [kept[n] for n in names])))
    out = {}
    for g in grids:
        layers = []
        for layer in range(model.cfg.n_layers):
            name = RP.GRIDS[g].hook_name(layer)
            layers.append(_reduce_by_hand(g, (clean_cache[name] - kept[name].detach()) * grads[name]))
        out[g] = torch.stack(layers)
    return out


def _grids_for(model, exclude=()):
    skip = set(exclude)
    if cage_lens.adapt(model).arch.attn_only:
        skip |= {"resid_mid", "mlp_out"}
    return [g for g in RP.GRIDS if g not in skip]


# ---------------------------------------------------------------------------- the estimate
@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_gxi_is_attribution_patching(kind):
    model = cached_model(kind)
    grids = _grids_for(model)
    clean_t, corrupted_t, clean_cache = runs(model)
    ours = RP.relevance_patch(model, corrupted_t, clean_cache, metric, grids, rules="gxi")
    reference = hand_rolled(model, grids)
    for g in grids:
        torch.testing.assert_close(ours[g], reference[g], rtol=1e-10, atol=1e-13, msg=g)
        assert ours[g].abs().max() > 1e-4, g  # the comparison is not between zeros


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
@pytest.mark.parametrize("rules", ["attnlrp", "cplrp"])
def test_lrp_rules_equal_the_gradient_taken_inside_lrp(kind, rules):
    model = cached_model(kind)
    exclude = ("attn_head_q_all_pos", "attn_head_q_by_pos", "attn_head_k_all_pos", "attn_head_k_by_pos") if rules == "cplrp" else ()
    grids = _grids_for(model, exclude)
    clean_t, corrupted_t, clean_cache = runs(model)
    ours = RP.relevance_patch(model, corrupted_t, clean_cache, metric, grids, rules=rules)
    reference = hand_rolled(model, grids, lambda: cage_lens.lrp(model, rules))
    plain = hand_rolled(model, ["resid_pre"])
    for g in grids:
        torch.testing.assert_close(ours[g], reference[g], rtol=1e-10, atol=1e-13, msg=g)
    assert not torch.allclose(ours["resid_pre"], plain["resid_pre"])  # the rules did change the gradient


def test_relp_variant_is_norm_and_activation_rules_with_plain_attention():
    """RelP's reference rules written by hand: LayerNorm scale constant, GELU passes grad · post/pre,
    attention untouched."""
    model = cached_model("gpt2")
    stash = {}

    def detach(tensor, hook):
        return tensor.detach()

    def remember(name):
        def hook(tensor, hook):
            stash[name] = tensor
        return hook

    def identity(name):
        def hook(post, hook):
            pre = stash.pop(name)
            ratio = torch.where(pre == 0, torch.zeros_like(pre), post / pre).detach()
            return post.detach() + (pre - pre.detach()) * ratio
        return hook

    hooks = [(n, detach) for n in model.hook_dict if n.endswith("hook_scale") and ("ln" in n)]
    for layer in range(model.cfg.n_layers):
        hooks += [(f"blocks.{layer}.mlp.hook_pre", remember(layer)), (f"blocks.{layer}.mlp.hook_post", identity(layer))]
    grids = ["resid_pre", "attn_out", "mlp_out", "attn_head_q_all_pos", "attn_head_v_by_pos"]
    clean_t, corrupted_t, clean_cache = runs(model)
    ours = RP.relevance_patch(model, corrupted_t, clean_cache, metric, grids, rules="relp")
    reference = hand_rolled(model, grids, lambda: model.hooks(fwd_hooks=hooks))
    for g in grids:
        torch.testing.assert_close(ours[g], reference[g], rtol=1e-10, atol=1e-13, msg=g)


def test_first_order_agrees_with_transformer_lens_patching_by_central_differences():
    """For a patch scaled by ε, TL's own activation patching changes the metric by ε · estimate + O(ε³)
    (central difference): pins the direction, sign, axis order and hook semantics of every grid family
    (bridge ``hook_resid_mid`` included) against ``transformer_lens.patching``."""
    model = cached_model("gpt2")
    clean_t, corrupted_t, clean_cache = runs(model, SHORT_CLEAN, SHORT_CORRUPTED)
    with torch.no_grad():
        _, corrupted_cache = model.run_with_cache(corrupted_t)
        base = float(metric(model(corrupted_t)))
    grids = ["resid_pre", "resid_mid", "mlp_out", "attn_head_out_by_pos", "attn_head_q_all_pos",
             "attn_head_pattern_all_pos"]
    estimate = RP.relevance_patch(model, corrupted_t, clean_cache, metric, grids, rules="gxi")
    eps = 1e-2

    def mixed(sign):
        return {k: corrupted_cache[k] + sign * eps * (clean_cache[k] - corrupted_cache[k]) for k in clean_cache.keys()}

    for g in grids:
        up = RP.activation_patch(model, corrupted_t, mixed(+1), metric, g).double() - base
        down = RP.activation_patch(model, corrupted_t, mixed(-1), metric, g).double() - base
        central = (up - down) / (2 * eps)
        # tolerance: TL stores patched metrics in float32 (~1e-7 absolute, / 2ε) plus the O(ε²) term
        scale = float(estimate[g].abs().max())
        assert scale > 1e-3, g
        torch.testing.assert_close(estimate[g], central, rtol=0, atol=2e-3 * scale + 1e-5, msg=g)


def _linear_attention_model():
    """Two-layer attention-only model without any normalisation: the logits are linear in every
    activation of the last layer that sits after its softmax (z, v, the pattern, attn_out)."""
    fields = dict(n_layers=2, d_model=16, n_heads=2, d_head=8, d_vocab=len(tiny_tokenizer()), n_ctx=32,
                  attn_only=True, normalization_type=None, positional_embedding_type="standard", act_fn="gelu",
                  seed=0, dtype=torch.float64)
    if has_hooked_transformer():
        from transformer_lens import HookedTransformer, HookedTransformerConfig

        model = HookedTransformer(HookedTransformerConfig(**fields, d_mlp=None, initializer_range=0.3), tokenizer=tiny_tokenizer())
    else:
        from transformer_lens.model_bridge import TransformerBridge

        model = TransformerBridge.boot_native(dict(fields, d_mlp=64), tokenizer=tiny_tokenizer(), device="cpu", dtype=torch.float64)
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0.0, 0.3) if p.ndim >= 2 else p.normal_(0.0, 0.1)
    return model.eval()


LINEAR_GRIDS = ("attn_out", "attn_head_out_all_pos", "attn_head_out_by_pos", "attn_head_v_all_pos",
                "attn_head_v_by_pos", "attn_head_pattern_all_pos", "attn_head_pattern_by_pos")


@pytest.fixture(scope="module")
def linear_case():
    """The model, its runs, and the exact effects of patching the last layer (own float64 sweep and
    TransformerLens' float32 one), computed once."""
    model = _linear_attention_model()
    clean_t, corrupted_t, clean_cache = runs(model, SHORT_CLEAN, SHORT_CORRUPTED)
    last = model.cfg.n_layers - 1
    with torch.no_grad():
        base = float(metric(model(corrupted_t)))
    exact = {g: _own_activation_patch(model, corrupted_t, clean_cache, g, last) for g in LINEAR_GRIDS}
    tl = {g: RP.activation_patch(model, corrupted_t, clean_cache, metric, g)[last].double() - base for g in LINEAR_GRIDS}
    return model, (clean_t, corrupted_t, clean_cache), exact, tl


def _own_activation_patch(model, corrupted_t, clean_cache, grid: str, layer: int) -> torch.Tensor:
    """Float64 activation patching of every cell of one layer (TL stores its grid in float32)."""
    spec = RP.GRIDS[grid]
    name = spec.hook_name(layer)
    base = metric(model(corrupted_t))
    shape = spec.reduce(clean_cache[name]).shape
    out = torch.zeros(shape, dtype=torch.float64)
    for index in torch.cartesian_prod(*[torch.arange(n) for n in shape]).reshape(-1, len(shape)).tolist():
        def patch(tensor, hook, index=index):
            tensor = tensor.clone()
            if spec.hook == "attn.hook_pattern":  # [batch, head, dest, src]: cells are (head[, dest])
                sel = (slice(None), *index)
            elif spec.axes[1:] == ("head",):  # [batch, pos, head, d]: cells are heads
                sel = (slice(None), slice(None), index[0])
            else:  # cells are (pos[, head])
                sel = (slice(None), *index)
            tensor[sel] = clean_cache[name][sel]
            return tensor
        with torch.no_grad(), model.hooks(fwd_hooks=[(name, patch)]):
            out[tuple(index)] = metric(model(corrupted_t)) - base
    return out


@pytest.mark.parametrize("rules", ["gxi", "cplrp", "attnlrp"])
def test_linear_map_makes_the_estimate_exact(linear_case, rules):
    model, (clean_t, corrupted_t, clean_cache), exact, tl = linear_case
    ours = RP.relevance_patch(model, corrupted_t, clean_cache, metric, LINEAR_GRIDS, rules=rules)
    last = model.cfg.n_layers - 1
    for g in LINEAR_GRIDS:
        # AttnLRP's uniform rule on pattern · v hands v half of the product's relevance (docs/patching.md)
        factor = 0.5 if (rules == "attnlrp" and "_v_" in g) else 1.0
        torch.testing.assert_close(ours[g][last], factor * exact[g], rtol=1e-9, atol=1e-12, msg=g)
        # TransformerLens stores the patched metric in float32
        torch.testing.assert_close(ours[g][last], factor * tl[g], rtol=1e-5, atol=1e-5, msg=g)
        assert exact[g].abs().max() > 1e-3, g


def test_attnlrp_query_grid_carries_the_quarter_of_the_uniform_rule(linear_case):
    model, (clean_t, corrupted_t, clean_cache), _, _ = linear_case
    names = ["attn_head_q_by_pos", "attn_head_k_all_pos"]
    lrp = RP.relevance_patch(model, corrupted_t, clean_cache, metric, names, rules="attnlrp")
    plain = RP.relevance_patch(model, corrupted_t, clean_cache, metric, names, rules="gxi")
    last = model.cfg.n_layers - 1  # nothing but the q·k and pattern·v products lies above the last q, k
    for g in names:
        torch.testing.assert_close(lrp[g][last], 0.25 * plain[g][last], rtol=1e-10, atol=1e-14)
        assert plain[g][last].abs().max() > 1e-4


# ---------------------------------------------------------------------------- shapes, bundles, directions
def test_every_grid_has_transformer_lens_shape_and_the_bundles_stack_them():
    model = cached_model("llama", n_layers=1)  # grouped-query attention: k and v grids have 2 kv heads
    clean_t, corrupted_t, clean_cache = runs(model, "the cat sat", "the dog sat")
    ours = RP.relevance_patch(model, corrupted_t, clean_cache, metric, list(RP.GRIDS), rules="gxi")
    for g in RP.GRIDS:
        tl = RP.activation_patch(model, corrupted_t, clean_cache, metric, g)
        assert ours[g].shape == tl.shape, g
    import transformer_lens.patching as tlp

    for ours_fn, tl_fn, names in (
        (RP.relevance_patch_block_every, tlp.get_act_patch_block_every, [f"{g}" for g in RP.BLOCK_GRIDS]),
        (RP.relevance_patch_attn_head_all_pos_every, tlp.get_act_patch_attn_head_all_pos_every,
         [f"attn_head_{p}_all_pos" for p in RP.HEAD_PARTS]),
        (RP.relevance_patch_attn_head_by_pos_every, tlp.get_act_patch_attn_head_by_pos_every,
         [f"attn_head_{p}_by_pos" for p in RP.HEAD_PARTS]),
    ):
        bundle = ours_fn(model, corrupted_t, clean_cache, metric, rules="gxi")
        assert bundle.shape == tl_fn(model, corrupted_t, clean_cache, metric).shape
        for i, name in enumerate(names):
            single = ours[name].transpose(1, 2) if name == "attn_head_pattern_by_pos" else ours[name]
            torch.testing.assert_close(bundle[i, ..., : single.shape[-1]], single)
            assert (bundle[i, ..., single.shape[-1]:] == 0).all()  # k, v zero-padded to n_heads


def test_named_functions_equal_the_generic_call():
    model = cached_model("gpt2")
    clean_t, corrupted_t, clean_cache = runs(model)
    both = RP.relevance_patch(model, corrupted_t, clean_cache, metric, ["resid_pre", "attn_head_out_all_pos"])
    torch.testing.assert_close(RP.relevance_patch_resid_pre(model, corrupted_t, clean_cache, metric), both["resid_pre"])
    torch.testing.assert_close(
        RP.relevance_patch_attn_head_out_all_pos(model, corrupted_t, clean_cache, metric), both["attn_head_out_all_pos"]
    )


def test_defaults_rap_with_cplrp_and_rules_alone_select_the_one_backward_estimate():
    model = cached_model("gpt2")
    clean_t, corrupted_t, clean_cache = runs(model)
    grids = ["resid_pre", "attn_head_k_by_pos"]
    default = RP.relevance_patch(model, corrupted_t, clean_cache, metric, grids)
    assert default.method["resid_pre"].startswith("rap") and default.method["attn_head_k_by_pos"].startswith("rap")
    assert RP.default_method("resid_pre") == "rap (cplrp)" and RP.default_method("attn_head_k_by_pos") == "rap (relp)"
    alone = RP.relevance_patch(model, corrupted_t, clean_cache, metric, "resid_pre")  # RAP's budget is per call
    torch.testing.assert_close(RP.relevance_patch_resid_pre(model, corrupted_t, clean_cache, metric), alone["resid_pre"])
    for fn, grid, rules in ((RP.relevance_patch_resid_pre, "resid_pre", "cplrp"),
                            (RP.relevance_patch_attn_head_k_by_pos, "attn_head_k_by_pos", "relp")):
        once = RP.relevance_patch(model, corrupted_t, clean_cache, metric, grid, method="one_backward")
        assert once.method[grid] == f"one_backward: {rules}"
        expected = RP.relevance_patch(model, corrupted_t, clean_cache, metric, grid, rules=rules)[grid]
        torch.testing.assert_close(once[grid], expected)
        torch.testing.assert_close(fn(model, corrupted_t, clean_cache, metric, method="one_backward"), expected)
    names = [f"attn_head_{p}_all_pos" for p in RP.HEAD_PARTS]
    relp = RP.relevance_patch(model, corrupted_t, clean_cache, metric, names, rules="relp")
    bundle = RP.relevance_patch_attn_head_all_pos_every(model, corrupted_t, clean_cache, metric, method="one_backward")
    torch.testing.assert_close(bundle[1], relp["attn_head_q_all_pos"])


def test_rules_that_cut_a_patched_activation_off_are_refused(monkeypatch):
    """A rule set the engine accepts but that detaches an activation leaves no gradient there: refuse
    instead of reporting zeros."""
    model = cached_model("gpt2")
    clean_t, corrupted_t, clean_cache = runs(model)

    def detach_values(adapter, rules):
        hooks = [PointHook(f"blocks.{layer}.attn.hook_v", lambda t, hook: t.detach()) for layer in range(model.cfg.n_layers)]
        return Realisation(rules, hooks)

    monkeypatch.setattr(engine, "realise", detach_values)
    custom = cage_lens.RuleSet("custom")
    with pytest.raises(InputError, match="no gradient reaches blocks.0.attn.hook_v"):
        RP.relevance_patch_attn_head_v_all_pos(model, corrupted_t, clean_cache, metric, rules=custom)
    assert hook_count(model) == 0


def test_agreement_compares_with_transformer_lens_in_both_directions():
    model = cached_model("gpt2")
    clean_t, corrupted_t, clean_cache = runs(model, SHORT_CLEAN, SHORT_CORRUPTED)
    with torch.no_grad():
        _, corrupted_cache = model.run_with_cache(corrupted_t)
    grids = ("resid_pre", "attn_head_out_all_pos")
    for direction, run_t, source in (("denoising", corrupted_t, clean_cache), ("noising", clean_t, corrupted_cache)):
        ag = RP.agreement(model, corrupted_tokens=SHORT_CORRUPTED, clean_tokens=SHORT_CLEAN, metric=metric, grids=grids,
                          rules=("rap", "cplrp", "gxi"), direction=direction, budget=1e-3)
        with torch.no_grad():
            base = float(metric(model(run_t)))
        assert ag.baseline == pytest.approx(base)
        for g in grids:
            tl = RP.activation_patch(model, run_t, source, metric, g).double() - base
            torch.testing.assert_close(ag.activation[g], tl)
            est = RP.relevance_patch(model, run_t, source, metric, g, rules="cplrp")[g]
            torch.testing.assert_close(ag.estimates["cplrp"][g], est)
            assert ag.pearson("cplrp", g) == pytest.approx(RP.pearson(est, tl))
            rap = RP.relevance_patch(model, run_t, source, metric, grids, budget=1e-3)
            torch.testing.assert_close(ag.estimates["rap"][g], rap[g])
            assert ag.method["rap"][g] == rap.method[g] and ag.cost["rap"] == pytest.approx(rap.total_cost)
        assert ag.flags["resid_pre"].keys() == rap.flags["resid_pre"].keys()
        flagged = torch.zeros_like(ag.changed["resid_pre"])
        for mask in rap.flags["resid_pre"].values():
            flagged |= mask
        assert torch.equal(ag.flagged("resid_pre"), flagged & ~rap.exact["resid_pre"])
        report = ag.flag_report("cplrp", "resid_pre")
        assert report["flagged"] == int(flagged.sum()) and 0 <= report["share"] <= 1
    table = ag.table()
    assert "pearson" in table and "flagged" in table and "cost (forward-equivalents)" in table
    assert set(ag.to_dict()["pearson"]) == {"rap", "cplrp", "gxi"} and ag.tl_forwards == 2 * 5 + 2 * 4


def test_agreement_refuses_positional_inputs_the_order_changed():
    """agreement() once took (clean, corrupted) positionally; TL's order is corrupted first. A positional
    call cannot say which order it meant, so it is refused rather than silently swapped."""
    model = cached_model("gpt2")
    with pytest.raises(InputError, match="by keyword"):
        RP.agreement(model, SHORT_CLEAN, SHORT_CORRUPTED, metric)
    with pytest.raises(InputError, match="needs clean_tokens"):
        RP.agreement(model, corrupted_tokens=SHORT_CORRUPTED, metric=metric)


def test_pearson_and_spearman_by_hand():
    a, b = torch.tensor([1.0, 2.0, 2.0, 3.0]), torch.tensor([1.0, 3.0, 2.0, 4.0])
    # ranks (ties averaged): a -> 1, 2.5, 2.5, 4; b -> 1, 3, 2, 4; Pearson of the ranks = 4.5 / sqrt(4.5 * 5)
    assert RP.spearman(a, b) == pytest.approx(3 / 10 ** 0.5, abs=1e-15)
    # centred a = (-1, 0, 0, 1), centred b = (-1.5, 0.5, -0.5, 1.5): 3 / sqrt(2 * 5)
    assert RP.pearson(a, b) == pytest.approx(3 / 10 ** 0.5, abs=1e-15)
    # centred (5, -1, -4)/3 and (-4, -1, 5)/3: -39 / 42
    assert RP.pearson(torch.tensor([4.0, 2.0, 1.0]), torch.tensor([1.0, 2.0, 4.0])) == pytest.approx(-13 / 14, abs=1e-15)
    assert RP.pearson(torch.zeros(3), a[:3]) != RP.pearson(torch.zeros(3), a[:3])  # NaN for a constant grid
    # below 1e-4 of the grid's largest |value| a cell ranks as 0: (1e-6, 0, 2e-6, 1) -> ranks (2, 2, 2, 4)
    tiny, other = torch.tensor([1e-6, 0.0, 2e-6, 1.0]), torch.tensor([3.0, 1.0, 2.0, 4.0])
    # centred ranks (-.5, -.5, -.5, 1.5) and (.5, -1.5, -.5, 1.5): 3 / sqrt(3 * 5)
    assert RP.spearman(tiny, other) == pytest.approx(3 / 15 ** 0.5, abs=1e-15)
    assert RP.spearman(tiny, other, floor=0) == pytest.approx(RP.pearson(torch.tensor([2.0, 1.0, 3.0, 4.0]), other))


# ---------------------------------------------------------------------------- Attribution views
def test_attribution_views_follow_transformer_lens_axes_and_equal_zero_patching():
    """Patching every activation to zero moves the metric by −relevance to first order, so the
    zero-cache estimate is −(the Attribution view), cell by cell."""
    model = cached_model("gpt2")
    tokens = model.to_tokens([CLEAN, CORRUPTED])
    attr = cage_lens.attribute(model, tokens, target=TARGET, contrast=CONTRAST, rules="attnlrp")
    zero = {n: torch.zeros_like(t) for n, t in model.run_with_cache(tokens)[1].items()}

    def summed_metric(logits):
        return (logits[:, -1, TARGET] - logits[:, -1, CONTRAST]).sum()

    grids = ["resid_pre", "resid_mid", "attn_head_out_by_pos", "attn_head_out_all_pos"]
    est = RP.relevance_patch(model, tokens, zero, summed_metric, grids, rules="attnlrp")
    torch.testing.assert_close(est["resid_pre"], -attr.stack("resid_pre").sum(0), rtol=1e-9, atol=1e-12)
    if not cage_lens.adapt(model).arch.is_bridge:  # on a bridge hook_resid_mid's write reaches only the MLP
        torch.testing.assert_close(est["resid_mid"], -attr.stack("resid_mid").sum(0), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(est["attn_head_out_by_pos"], -attr.head_grid().sum(0), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(est["attn_head_out_all_pos"], -attr.head_grid(by_pos=False).sum(0), rtol=1e-9, atol=1e-12)
    stacked, labels = attr.stack_head_relevance(return_labels=True)
    assert labels[:5] == ["L0H0", "L0H1", "L0H2", "L0H3", "L1H0"] and len(labels) == stacked.shape[0] == 8
    torch.testing.assert_close(stacked[labels.index("L1H2")], attr.head_relevance[:, 1, 2])
    assert attr.stack("resid_post").shape == (2, 2, tokens.shape[1])
    with pytest.raises(InputError, match="no residual point 'attn_out'"):
        attr.stack("attn_out")


# ---------------------------------------------------------------------------- zoo corruptions
@pytest.mark.parametrize("task", ["ioi", "pointer-chase", "facts", "arith"])
def test_zoo_corruptions_change_one_token_and_the_answer(task):
    from cage_lens import zoo

    model, spec = zoo.load(task), zoo.task(task)
    kinds = spec.corruptions()
    assert {kind for _, kind in kinds.values()} <= {"value", "routing"}
    if task in ("ioi", "pointer-chase"):
        assert any(kind == "routing" for _, kind in kinds.values())
    flips = 0
    for sample in spec.sample(4, seed=11):
        for name, (options, kind) in kinds.items():
            pair = spec.corrupt(sample, **options)
            assert pair == spec.corrupt(sample, **options)  # deterministic
            clean, corrupted = model.to_tokens(pair.clean), model.to_tokens(pair.corrupted)
            assert clean.shape == corrupted.shape
            assert (clean != corrupted).nonzero()[:, 1].tolist() == [pair.position]
            assert model.to_str_tokens(corrupted)[pair.position] == pair.replacement
            with torch.no_grad():
                assert model.to_string(model(clean)[0, -1].argmax()).strip() == pair.answer
                if pair.corrupted_answer is not None:
                    assert model.to_string(model(corrupted)[0, -1].argmax()).strip() == pair.corrupted_answer
            if name == "abc":  # no name repeats: the prompt determines no answer; the model picks one of the two
                assert pair.replacement not in pair.clean.split() and pair.corrupted_answer is None
                with torch.no_grad():
                    top = model.to_string(model(corrupted)[0, -1].argmax()).strip()
                assert top in (pair.answer, pair.contrast)
                flips += top != pair.answer
    assert task != "ioi" or flips >= 1


# ---------------------------------------------------------------------------- bad input and hygiene
def test_bad_inputs_raise_clear_errors():
    model = cached_model("gpt2")
    clean_t, corrupted_t, clean_cache = runs(model)
    with pytest.raises(InputError, match="different shapes"):
        RP.agreement(model, corrupted_tokens="the dog sat on the mat", clean_tokens=CLEAN, metric=metric)
    with pytest.raises(InputError, match="same batch size and token length"):
        RP.relevance_patch_resid_pre(model, model.to_tokens("the dog sat"), clean_cache, metric)
    with pytest.raises(InputError, match="must return a scalar"):
        RP.relevance_patch_resid_pre(model, corrupted_t, clean_cache, lambda l: l[:, -1, TARGET])
    with pytest.raises(InputError, match="do not call .item"):
        RP.relevance_patch_resid_pre(model, corrupted_t, clean_cache, lambda l: float(l[0, -1, 0]))
    with pytest.raises(InputError, match="does not depend on the logits"):
        RP.relevance_patch_resid_pre(model, corrupted_t, clean_cache, lambda l: torch.tensor(1.0))
    with pytest.raises(InputError, match="unknown patching grid 'resid_post'"):
        RP.relevance_patch(model, corrupted_t, clean_cache, metric, "resid_post")
    with pytest.raises(InputError, match="unknown rule set 'lrp'"):
        RP.relevance_patch_resid_pre(model, corrupted_t, clean_cache, metric, rules="lrp")
    with pytest.raises(InputError, match="detaches q and k"):
        RP.relevance_patch_attn_head_q_all_pos(model, corrupted_t, clean_cache, metric, rules="cplrp")
    with pytest.raises(InputError, match="has no 'blocks.0.hook_attn_out'"):
        RP.relevance_patch_attn_out(model, corrupted_t, {}, metric)
    with pytest.raises(InputError, match="direction must be"):
        RP.agreement(model, corrupted_tokens=CORRUPTED, clean_tokens=CLEAN, metric=metric, direction="both")
    with pytest.raises(InputError, match="unknown patching method 'fast'"):
        RP.relevance_patch(model, corrupted_t, clean_cache, metric, method="fast")
    no_batch = model.run_with_cache(model.to_tokens(CLEAN), remove_batch_dim=True)[1]
    for method in ("rap", "one_backward"):
        with pytest.raises(InputError, match="remove_batch_dim=True"):
            RP.relevance_patch_resid_pre(model, corrupted_t, no_batch, metric, method=method)
    with pytest.raises(InputError, match="remove_batch_dim=True"):  # a plain dict of batch-less tensors
        RP.relevance_patch_resid_pre(model, corrupted_t, dict(no_batch.items()), metric)
    with pytest.raises(InputError, match="attention-only"):
        RP.relevance_patch_mlp_out(cached_model("attn_only"), corrupted_t, clean_cache, metric)
    with pytest.raises(InputError, match="\\[batch, pos\\]"):
        RP.relevance_patch_resid_pre(model, corrupted_t[0], clean_cache, metric)


def test_leaves_the_model_as_it_was(monkeypatch):
    model = cached_model("gpt2")
    clean_t, corrupted_t, clean_cache = runs(model)
    before = model(corrupted_t)
    RP.relevance_patch_block_every(model, corrupted_t, clean_cache, metric, rules="attnlrp")
    with pytest.raises(InputError):
        RP.relevance_patch_resid_pre(model, corrupted_t, clean_cache, lambda l: l)
    assert hook_count(model) == 0
    assert torch.equal(model(corrupted_t), before)
    assert all(p.grad is None for p in model.parameters())
    RP.relevance_patch(model, corrupted_t, clean_cache, metric, ["resid_pre", "attn_head_out_all_pos"], budget=1e-3)
    RP.relevance_patch(model, corrupted_t, clean_cache, metric, ["resid_pre", "attn_head_out_all_pos"], method="atp_star")
    assert hook_count(model) == 0
    assert torch.equal(model(corrupted_t), before)
    assert all(p.grad is None for p in model.parameters())
    ag = RP.agreement(model, corrupted_tokens=SHORT_CORRUPTED, clean_tokens=SHORT_CLEAN, metric=metric,
                      grids=("attn_head_out_all_pos",), rules=("gxi",))
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)
    with pytest.raises(ImportError, match="needs matplotlib"):
        ag.scatter("attn_head_out_all_pos")
