"""Exact suffix patching, routing-aware patching (RAP) and AtP*: numbers pinned against TransformerLens'
own activation patching, brute-force forwards with hooks, and hand-computed softmaxes."""

from __future__ import annotations

import pytest
import torch

import cage_lens
from cage_lens import patching as RP
from cage_lens.errors import UnsupportedModelError
from cage_lens.patching import atp_star, exact, routing
from cage_lens.patching.estimate import gradients, tapped_run
from cage_lens.patching.patch import default_budget
from cage_lens.patching.rules import resolve_patch_rules
from cage_lens.patching.runs import rows_read
from cage_lens.testing import random_model
from conftest import EXACT, FLOAT32_INSIDE, cached_model, hook_count
from test_patching import metric
from test_patching import runs as patching_runs

#: a batch of two prompts, the corruption early (position 2): many rows and layers to patch
CLEAN = ["the cat sat on the mat and the dog ran", "the dog sat on the box and the cat ran"]
CORRUPTED = ["the dog sat on the mat and the dog ran", "the cat sat on the box and the cat ran"]
FOUR = ("resid_pre", "attn_out", "mlp_out", "attn_head_out_all_pos")


def runs(model, clean=CLEAN, corrupted=CORRUPTED):
    """Tokens, the clean cache, and the corrupted run's metric."""
    clean_t, corrupted_t, clean_cache = patching_runs(model, clean, corrupted)
    with torch.no_grad():
        base = float(metric(model(corrupted_t)))
    return clean_t, corrupted_t, clean_cache, base


def tolerance(model) -> dict:
    """float64 end to end on a HookedTransformer; a bridge's HF modules compute softmax and RMSNorm in
    float32 inside a float64 model (conftest.FLOAT32_INSIDE)."""
    return FLOAT32_INSIDE if cage_lens.adapt(model).arch.is_bridge else EXACT


def sharp_model(kind: str, **config):
    """Random weights large enough that most attention rows sit on one key (p ≥ ½): the saturated case."""
    return random_model(kind, init_scale=0.45, seed=1, **config)


#: sliding windows shorter than the 11-token prompts: Mistral's in every layer (6 positions: the corruption
#: at position 2 still reaches the last row through two layers), Gemma-2's in every other layer
WINDOWED = [("mistral", 6), ("gemma2", 4)]


# ---------------------------------------------------------------------------- exact suffix patching
@pytest.mark.parametrize("kind", ["gpt2", "llama", "attn_only"])
def test_exact_patching_equals_transformer_lens_on_every_grid(kind):
    """method="exact" recomputes only the rows and layers a patch can change, from the patched run's
    key/value cache; every grid equals TL's get_act_patch_* minus the unpatched metric (TL stores its
    grids in float32: that rounding, relative to the metric, is the tolerance)."""
    model = cached_model(kind)
    clean_t, corrupted_t, clean_cache, base = runs(model)
    grids = [g for g in RP.GRIDS if not (cage_lens.adapt(model).arch.attn_only and g in ("resid_mid", "mlp_out"))]
    if hasattr(model, "original_model") and getattr(model.original_model, "config", None) is None:  # TL-native bridge
        with pytest.raises(UnsupportedModelError, match="TransformerLens-native model, which has no key/value cache"):
            RP.relevance_patch(model, corrupted_t, clean_cache, metric, grids, method="exact")
        return
    ours = RP.relevance_patch(model, corrupted_t, clean_cache, metric, grids, method="exact")
    for g in grids:
        tl = RP.activation_patch(model, corrupted_t, clean_cache, metric, g).double() - base
        assert ours.method[g] == "exact" and bool(ours.exact[g].all())
        torch.testing.assert_close(ours[g], tl, rtol=0, atol=4e-7 * (1 + abs(base) + float(tl.abs().max())), msg=g)
        assert tl.abs().max() > 1e-3, g  # not a comparison of zeros
    assert ours.total_cost < ours.tl_forwards  # fewer forward-equivalents than TL's sweep
    assert hook_count(model) == 0


@pytest.mark.parametrize("family, window", WINDOWED)
def test_exact_patching_equals_transformer_lens_under_a_sliding_window(family, window):
    """Under a sliding window the suffix runs still read every earlier position's keys (a sliding-window
    layer's own HF cache would drop those outside the window; the window is the attention mask's), and a
    one-row batch holds rows of one position only (the window masks by position in the batch): TL's
    grids, as without a window."""
    model = random_model(family, sliding_window=window)
    clean_t, corrupted_t, clean_cache, base = runs(model)
    assert cage_lens.adapt(model).attention_window(0) == window < corrupted_t.shape[1]
    ours = RP.relevance_patch(model, corrupted_t, clean_cache, metric, FOUR, method="exact")
    for g in FOUR:
        tl = RP.activation_patch(model, corrupted_t, clean_cache, metric, g).double() - base
        assert ours.method[g] == "exact" and bool(ours.exact[g].all())
        torch.testing.assert_close(ours[g], tl, rtol=0, atol=4e-7 * (1 + abs(base) + float(tl.abs().max())), msg=g)
        assert tl.abs().max() > 1e-3, g
    assert hook_count(model) == 0


def _own_patch(model, corrupted_t, clean_cache, name: str, setter) -> float:
    """One float64 activation patch by hand: TL's forward with a hook that applies ``setter``."""
    def patch(tensor, hook):
        tensor = tensor.clone()
        setter(tensor, clean_cache[name])
        return tensor
    with torch.no_grad(), model.hooks(fwd_hooks=[(name, patch)]):
        return float(metric(model(corrupted_t)))


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_exact_patching_equals_a_float64_sweep_to_rounding(kind):
    """TL's own grids are float32; against a float64 patch by hand the exact engine agrees to rounding."""
    model = cached_model(kind)
    clean_t, corrupted_t, clean_cache, base = runs(model)
    ours = RP.relevance_patch(model, corrupted_t, clean_cache, metric, ["resid_pre", "attn_head_out_all_pos"],
                              method="exact")
    tol = tolerance(model)
    for layer in range(model.cfg.n_layers):
        for pos in range(corrupted_t.shape[1]):
            def setter(t, src, pos=pos):
                t[:, pos] = src[:, pos]
            by_hand = _own_patch(model, corrupted_t, clean_cache, f"blocks.{layer}.hook_resid_pre", setter) - base
            assert float(ours["resid_pre"][layer, pos]) == pytest.approx(by_hand, rel=tol["rtol"], abs=tol["atol"] * 1e2)
        for head in range(model.cfg.n_heads):
            def setter(t, src, head=head):
                t[:, :, head] = src[:, :, head]
            by_hand = _own_patch(model, corrupted_t, clean_cache, f"blocks.{layer}.attn.hook_z", setter) - base
            assert float(ours["attn_head_out_all_pos"][layer, head]) == pytest.approx(by_hand, rel=tol["rtol"],
                                                                                     abs=tol["atol"] * 1e2)


def test_the_cache_path_is_checked_before_any_cell(monkeypatch):
    """A suffix run that does not reproduce the full forward is refused (explicit method), or the default
    falls back to the one-backward estimate and says so, in the result and in a warning."""
    model = cached_model("gpt2")
    clean_t, corrupted_t, clean_cache, _ = runs(model)
    original = exact.SuffixPatcher._run

    def broken(self, *args, **kwargs):
        logits, store = original(self, *args, **kwargs)
        return logits + 1.0, store

    monkeypatch.setattr(exact.SuffixPatcher, "_run", broken)
    with pytest.raises(UnsupportedModelError, match="cannot be trusted for exact patching"):
        RP.relevance_patch(model, corrupted_t, clean_cache, metric, "resid_pre", method="exact")
    with pytest.warns(UserWarning, match="falls back to the one-backward estimate"):
        result = RP.relevance_patch(model, corrupted_t, clean_cache, metric, "resid_pre")
    assert result.method["resid_pre"].startswith("one_backward: cplrp (exact patching unavailable")
    torch.testing.assert_close(result["resid_pre"],
                               RP.relevance_patch(model, corrupted_t, clean_cache, metric, "resid_pre", rules="cplrp")["resid_pre"])
    assert hook_count(model) == 0


def test_rows_the_metric_reads():
    logits = torch.randn(2, 5, 30, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert rows_read(metric, logits) == [4]
    assert rows_read(lambda l: (l[:, 1, 0] + l[:, 3, 2]).sum(), logits) == [1, 3]
    # a row read only through an argmax has no gradient: the noise check catches it, every row counts
    argmax = lambda l: l[:, -1, int(l[0, 0].argmax())].sum()  # noqa: E731
    assert rows_read(argmax, logits) == [0, 1, 2, 3, 4]


# ---------------------------------------------------------------------------- routing-aware patching
def test_default_budget_is_16_within_a_tenth_and_a_75th_of_the_sweep():
    assert default_budget(156) == pytest.approx(15.6)     # IOI's four grids: at most 1/10
    assert default_budget(280) == 16.0                    # facts
    assert default_budget(9360) == pytest.approx(124.8)   # GPT-2 small, 256 tokens, four grids: 1/75
    assert default_budget(144) == pytest.approx(14.4)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_rap_is_exact_when_the_budget_allows_and_stays_within_it(kind):
    model = cached_model(kind)
    clean_t, corrupted_t, clean_cache, base = runs(model)
    exact_all = RP.relevance_patch(model, corrupted_t, clean_cache, metric, FOUR, method="exact")
    rap = RP.relevance_patch(model, corrupted_t, clean_cache, metric, FOUR, budget=1000.0)
    for g in FOUR:
        assert rap.method[g] == "rap: exact" and bool(rap.exact[g].all())
        torch.testing.assert_close(rap[g], exact_all[g], rtol=0, atol=1e-12)
    for budget in (12.0, 20.0):
        capped = RP.relevance_patch(model, corrupted_t, clean_cache, metric, FOUR, budget=budget)
        assert capped.total_cost <= budget + 1e-9
        assert capped.speedup == pytest.approx(capped.tl_forwards / capped.total_cost)
        for g in FOUR:  # the cells it patched exactly carry TL's numbers
            torch.testing.assert_close(capped[g][capped.exact[g]], exact_all[g][capped.exact[g]], rtol=0, atol=1e-12)
    tl = sum(exact_all[g].numel() for g in FOUR)
    assert rap.tl_forwards == tl and RP.relevance_patch(model, corrupted_t, clean_cache, metric, FOUR,
                                                        speedup=tl / 14.0).total_cost <= 14.0 + 1e-9


def _row_estimate_by_hand(model, corrupted_t, clean_cache, layer: int, pos: int, window: int | None = None) -> float:
    """The row-exact estimate of resid_pre cell (layer, pos), written out with full softmaxes: row pos's
    exact trajectory from a patched forward (rows before it do not move), every later row's attention
    recomputed with row pos's new key and value, one layer at a time, carried by the CP-LRP gradient at z.
    ``window``: every layer sees only the last ``window`` positions, its own included."""
    adapter = cage_lens.adapt(model)
    n_layers, T = model.cfg.n_layers, corrupted_t.shape[1]
    z_names = [f"blocks.{l}.attn.hook_z" for l in range(n_layers)]
    _, G = gradients(model, adapter, corrupted_t, metric, z_names, resolve_patch_rules("cplrp"))
    site = lambda l: adapter.layer(l)  # noqa: E731
    names = [n for l in range(n_layers) for n in ((site(l).rot_q or site(l).q), (site(l).rot_k or site(l).k),
                                                      site(l).v, f"blocks.{l}.attn.hook_pattern")]
    with torch.no_grad():
        _, dst = model.run_with_cache(corrupted_t)

        def patch(t, hook):
            t = t.clone()
            t[:, pos] = clean_cache[f"blocks.{layer}.hook_resid_pre"][:, pos]
            return t
        kept = {}
        keep = lambda name: (lambda t, hook: kept.__setitem__(name, t.detach()))  # noqa: E731
        with model.hooks(fwd_hooks=[(f"blocks.{layer}.hook_resid_pre", patch)] + [(n, keep(n)) for n in names]):
            patched_logits = model(corrupted_t)
    total = 0.0
    if pos == T - 1:
        with torch.no_grad():
            logits = model(corrupted_t)
            base = float(metric(logits))
            logits[:, pos] = patched_logits[:, pos]
            total += float(metric(logits)) - base
    H = model.cfg.n_heads
    expand = lambda x: x.repeat_interleave(H // x.shape[-2], dim=-2)  # noqa: E731
    for l in range(layer, n_layers):
        q = dst[site(l).rot_q or site(l).q].double()
        k, v = expand(dst[site(l).rot_k or site(l).k].double()), expand(dst[site(l).v].double())
        k_new, v_new = k.clone(), v.clone()
        k_new[:, pos] = expand(kept[site(l).rot_k or site(l).k].double())[:, pos]
        v_new[:, pos] = expand(kept[site(l).v].double())[:, pos]
        scale = adapter.score_scale(l)
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        if window is not None:
            causal &= ~torch.ones(T, T, dtype=torch.bool).tril(-window)   # keys window or more back
        old = (torch.einsum("bihe,bjhe->bhij", q, k) * scale).masked_fill(~causal, float("-inf")).softmax(-1)
        new = (torch.einsum("bihe,bjhe->bhij", q, k_new) * scale).masked_fill(~causal, float("-inf")).softmax(-1)
        dz = torch.einsum("bhij,bjhe->bihe", new, v_new) - torch.einsum("bhij,bjhe->bihe", old, v)
        total += float((dz[:, pos + 1:] * G[f"blocks.{l}.attn.hook_z"].double()[:, pos + 1:]).sum())
    return total


@pytest.mark.parametrize("kind, window", [("gpt2", None), ("llama", None), ("mistral", 4), ("mistral", 6)])
def test_row_exact_estimate_equals_its_formula_with_full_softmaxes(kind, window):
    """The closed form (one column of each later row changes; A_ip and lse^{¬p} taken directly where a
    row sits on key p) against explicit softmaxes, on a model whose attention is saturated; under a
    sliding window only the rows that still see key p re-read it, and a cell's own row runs at its own
    position (three layers, so that a layer-0 cell's row feeds rows the metric reads through the last)."""
    model = sharp_model(kind, **({"sliding_window": window, "n_layers": 3} if window else {}))
    clean_t, corrupted_t, clean_cache, _ = runs(model)
    est = RP.relevance_patch(model, corrupted_t, clean_cache, metric, "resid_pre", budget=1e-3)
    assert est.method["resid_pre"] == "rap: row-exact + cplrp"
    tol = tolerance(model)
    changed = (clean_t != corrupted_t).any(0).nonzero().flatten()
    checked = 0
    for layer in range(model.cfg.n_layers):
        for pos in range(int(changed[0]), corrupted_t.shape[1]):
            if not est.exact["resid_pre"][layer, pos]:
                by_hand = _row_estimate_by_hand(model, corrupted_t, clean_cache, layer, pos, window)
                assert float(est["resid_pre"][layer, pos]) == pytest.approx(by_hand, rel=tol["rtol"] * 10, abs=1e-9)
                checked += 1
    assert checked >= 6
    assert float(est.routing_tv["resid_pre"].max()) > 0.5  # the saturated case was exercised


def test_rows_without_a_key_are_exact_where_the_row_sits_on_that_key():
    """lse^{¬p} and the mean of w under row i's softmax without key p, against brute force, on rows that
    sit on key p with p(1 − p) ~ e^-40: the shortcut (Σ P w − P_p w_p) / (1 − P_p) divides 0 by 0 there."""
    T, H = 6, 2
    generator = torch.Generator().manual_seed(0)
    scores = torch.randn(1, H, T, T, dtype=torch.float64, generator=generator)
    scores[0, :, 3:, 2] += 40.0  # rows 3.. sit on key 2
    scores = scores.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
    lse = scores.logsumexp(-1)
    pattern = (scores - lse[..., None]).exp()
    att = routing.LayerAttention(None, None, None, scores, lse, pattern, 1.0, torch.ones(T, T, dtype=torch.bool).tril())
    w = torch.randn(1, H, T, T, dtype=torch.float64, generator=generator)
    rows = torch.tensor([2, 1])
    lse_rest, mean_rest = routing.RowEstimate._without_column(att, w, (pattern * w).sum(-1), rows)
    for c, p in enumerate(rows.tolist()):
        for i in range(p + 1, T):
            row = scores[0, :, i].clone()
            row[:, p] = float("-inf")
            torch.testing.assert_close(lse_rest[c, 0, :, i], row.logsumexp(-1), rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(mean_rest[c, 0, :, i], (row.softmax(-1) * w[0, :, i]).sum(-1), rtol=1e-10,
                                       atol=1e-12)
    assert float(pattern[0, :, 3:, 2].min()) > 1 - 1e-15  # the saturated case was exercised


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_row_exact_estimate_is_exact_when_no_later_row_is_read(kind):
    """A cell on the last position changes no row the metric reads after it: the estimate is the exact
    effect (its own row's trajectory is exact)."""
    model = sharp_model(kind)
    clean_t, corrupted_t, clean_cache, _ = runs(model, [c[:-4] + " dog" for c in CLEAN], [c[:-4] + " cat" for c in CLEAN])
    est = RP.relevance_patch(model, corrupted_t, clean_cache, metric, ["resid_pre", "attn_out", "mlp_out"], budget=1e-3)
    truth = RP.relevance_patch(model, corrupted_t, clean_cache, metric, ["resid_pre", "attn_out", "mlp_out"],
                               method="exact")
    tol = tolerance(model)
    for g in ("resid_pre", "attn_out", "mlp_out"):
        assert not est.exact[g][:, -1].any()  # estimated, not patched
        torch.testing.assert_close(est[g][:, -1], truth[g][:, -1], rtol=tol["rtol"] * 10, atol=1e-9, msg=g)
        assert truth[g][:, -1].abs().max() > 1e-3


def test_pointer_chase_start_key_is_flagged_and_estimated_right():
    """The textbook routing failure: the start key switches a saturated attention row. The one-backward
    estimate of its layer-0 cell is ~0; RAP's estimate has the right size, and the cell carries the
    saturated_switch and disagree flags."""
    from cage_lens import zoo

    model, task = zoo.load("pointer-chase"), zoo.task("pointer-chase")
    pair = task.corrupt(task.sample(1, seed=0)[0])
    answer, contrast = (int(model.to_tokens(" " + w, prepend_bos=False)[0, 0]) for w in (pair.answer, pair.contrast))

    def chase_metric(logits):
        return (logits[:, -1, answer] - logits[:, -1, contrast]).mean()

    with torch.no_grad():
        _, clean_cache = model.run_with_cache(model.to_tokens(pair.clean))
    corrupted = model.to_tokens(pair.corrupted)
    cell = (0, pair.position)
    truth = RP.relevance_patch(model, corrupted, clean_cache, chase_metric, "resid_pre", method="exact")["resid_pre"]
    once = RP.relevance_patch(model, corrupted, clean_cache, chase_metric, "resid_pre", rules="cplrp")["resid_pre"]
    rap = RP.relevance_patch(model, corrupted, clean_cache, chase_metric, "resid_pre", budget=1e-3)
    assert float(truth[cell]) > 10 and abs(float(once[cell])) < 0.1 * float(truth[cell])
    assert float(rap["resid_pre"][cell]) == pytest.approx(float(truth[cell]), rel=0.2)
    assert rap.flags["resid_pre"]["saturated_switch"][cell] and rap.flags["resid_pre"]["disagree"][cell]
    assert rap.unreliable("resid_pre")[cell] and float(rap.routing_tv["resid_pre"][cell]) > 0.9
    assert "saturated_switch" in rap.summary()
    default = RP.relevance_patch(model, corrupted, clean_cache, chase_metric, FOUR)  # late key: all exact, cheaply
    assert all(m == "rap: exact" for m in default.method.values()) and default.speedup > 10


def test_tapped_forward_gives_the_one_backward_gradients():
    """RAP reuses its patched run's forward for the backward, outside the rules' context: the same
    gradients as a forward and backward inside it."""
    for kind in ("gpt2", "llama"):
        model = cached_model(kind)
        clean_t, corrupted_t, clean_cache, _ = runs(model)
        adapter = cage_lens.adapt(model)
        names = [f"blocks.{l}.{h}" for l in range(model.cfg.n_layers) for h in ("hook_resid_pre", "attn.hook_z")]
        for rules in ("cplrp", "attnlrp", "gxi"):
            rule_set = resolve_patch_rules(rules)
            _, inside = gradients(model, adapter, corrupted_t, metric, names, rule_set)
            later = tapped_run(model, adapter, corrupted_t, clean_cache, metric, names, names, rule_set).gradients()
            for n in names:  # a bridge's forward with the HF key/value cache sums in another order
                torch.testing.assert_close(later[n], inside[n], **EXACT)
        assert hook_count(model) == 0


# ---------------------------------------------------------------------------- AtP*
def _atp_star_by_hand(model, corrupted_t, clean_cache, layer: int, pos: int) -> float:
    """AtP* of resid_pre cell (layer, pos) with forwards and autograd only: AtP, minus the linear q/k
    term of row pos at every block its δ reaches along the skip path, plus that block's exact pattern
    change (each taken from a forward whose input at that block and row is the patched run's plus δ)."""
    adapter = cage_lens.adapt(model)
    n_layers = model.cfg.n_layers
    names = [f"blocks.{layer}.hook_resid_pre"] + [n for l in range(n_layers) for n in (
        adapter.layer(l).q, adapter.layer(l).k, f"blocks.{l}.attn.hook_pattern")]
    acts, g = gradients(model, adapter, corrupted_t, metric, names, resolve_patch_rules("gxi"))
    name = f"blocks.{layer}.hook_resid_pre"
    delta = clean_cache[name][:, pos] - acts[name][:, pos]
    total = float((delta * g[name][:, pos]).sum())
    for l in range(layer, n_layers):
        point = f"blocks.{l}.hook_resid_pre"
        kept = {}

        def nudge(t, hook):
            t = t.clone()
            t[:, pos] = t[:, pos] + delta
            return t
        keep = lambda n: (lambda t, hook: kept.__setitem__(n, t.detach()))  # noqa: E731
        watched = [adapter.layer(l).q, adapter.layer(l).k, f"blocks.{l}.attn.hook_pattern"]
        with torch.no_grad(), model.hooks(fwd_hooks=[(point, nudge)] + [(n, keep(n)) for n in watched]):
            model(corrupted_t)
        q_name, k_name, p_name = watched
        total -= float(((kept[q_name] - acts[q_name]) * g[q_name]).sum() + ((kept[k_name] - acts[k_name]) * g[k_name]).sum())
        total += float(((kept[p_name] - acts[p_name]) * g[p_name]).sum())
    return total


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_atp_star_qk_fix_by_brute_force(kind):
    model = sharp_model(kind)
    clean_t, corrupted_t, clean_cache, _ = runs(model)
    star = RP.relevance_patch(model, corrupted_t, clean_cache, metric, ["resid_pre"], method="atp_star")
    plain = RP.relevance_patch(model, corrupted_t, clean_cache, metric, ["resid_pre"], rules="gxi")["resid_pre"]
    assert star.method["resid_pre"] == "atp*: gxi + QK fix"
    tol = tolerance(model)
    first = int((clean_t != corrupted_t).any(0).nonzero()[0])
    moved = 0.0
    for layer in range(model.cfg.n_layers):
        for pos in range(first, corrupted_t.shape[1]):
            by_hand = _atp_star_by_hand(model, corrupted_t, clean_cache, layer, pos)
            assert float(star["resid_pre"][layer, pos]) == pytest.approx(by_hand, rel=tol["rtol"] * 10, abs=1e-9)
            moved = max(moved, abs(float(star["resid_pre"][layer, pos] - plain[layer, pos])))
    assert moved > 1e-3  # the QK fix changed something


def test_atp_star_qk_fix_by_brute_force_under_a_sliding_window():
    """AtP*'s exact pattern change reads the layer's window: a row re-softmaxes only the keys it sees, and a
    later row re-reads key p only while p is inside its window (Mistral, window 4 < the 11-token prompt)."""
    model = random_model("mistral", sliding_window=4)
    clean_t, corrupted_t, clean_cache, _ = runs(model)
    star = RP.relevance_patch(model, corrupted_t, clean_cache, metric, ["resid_pre"], method="atp_star")
    assert star.method["resid_pre"] == "atp*: gxi + QK fix"
    tol = tolerance(model)
    first = int((clean_t != corrupted_t).any(0).nonzero()[0])
    for layer in range(model.cfg.n_layers):
        for pos in range(first, corrupted_t.shape[1]):
            by_hand = _atp_star_by_hand(model, corrupted_t, clean_cache, layer, pos)
            assert float(star["resid_pre"][layer, pos]) == pytest.approx(by_hand, rel=tol["rtol"] * 10, abs=1e-9)


def _atp_star_head_by_hand(model, corrupted_t, clean_cache, layer: int, head: int) -> float:
    """AtP* of attn_head_out_all_pos cell (layer, head) with forwards and autograd only: AtP on the head's
    z, minus the linear q/k term at every later block its output change reaches along the skip path, plus
    that block's exact pattern change. The change is read off the model: the block's attention output with
    the head's z patched, minus the corrupted one (every row at once)."""
    adapter = cage_lens.adapt(model)
    n_layers = model.cfg.n_layers
    z_name, out_name = f"blocks.{layer}.attn.hook_z", f"blocks.{layer}.hook_attn_out"
    names = [z_name] + [n for l in range(n_layers) for n in (
        adapter.layer(l).q, adapter.layer(l).k, f"blocks.{l}.attn.hook_pattern")]
    acts, g = gradients(model, adapter, corrupted_t, metric, names, resolve_patch_rules("gxi"))
    total = float(((clean_cache[z_name] - acts[z_name])[:, :, head] * g[z_name][:, :, head]).sum())
    kept = {}
    keep = lambda n: (lambda t, hook: kept.__setitem__(n, t.detach()))  # noqa: E731

    def patch_z(t, hook):
        t = t.clone()
        t[:, :, head] = clean_cache[z_name][:, :, head]
        return t
    with torch.no_grad():
        with model.hooks(fwd_hooks=[(out_name, keep("corrupted"))]):
            model(corrupted_t)
        with model.hooks(fwd_hooks=[(z_name, patch_z), (out_name, keep("patched"))]):
            model(corrupted_t)
    change = kept["patched"] - kept["corrupted"]
    for l in range(layer + 1, n_layers):
        watched = [adapter.layer(l).q, adapter.layer(l).k, f"blocks.{l}.attn.hook_pattern"]
        with torch.no_grad(), model.hooks(fwd_hooks=[(f"blocks.{l}.hook_resid_pre", lambda t, hook: t + change)]
                                          + [(n, keep(n)) for n in watched]):
            model(corrupted_t)
        q_name, k_name, p_name = watched
        total -= float(((kept[q_name] - acts[q_name]) * g[q_name]).sum() + ((kept[k_name] - acts[k_name]) * g[k_name]).sum())
        total += float(((kept[p_name] - acts[p_name]) * g[p_name]).sum())
    return total


def test_atp_star_head_qk_fix_by_brute_force_under_a_sliding_window():
    """A head's QK fix re-softmaxes every row its output reaches, each over the keys its window shows
    (Mistral, window 4 < the 11-token prompt; three sharp layers, so the corruption at position 2 reaches the
    metric's row): AtP* = its forward/autograd definition on every head cell."""
    model = sharp_model("mistral", sliding_window=4, n_layers=3)
    clean_t, corrupted_t, clean_cache, _ = runs(model)
    grid = "attn_head_out_all_pos"
    star = RP.relevance_patch(model, corrupted_t, clean_cache, metric, [grid], method="atp_star")
    plain = RP.relevance_patch(model, corrupted_t, clean_cache, metric, [grid], rules="gxi")[grid]
    assert star.method[grid] == "atp*: gxi + QK fix"
    tol = tolerance(model)
    moved = 0.0
    for layer in range(model.cfg.n_layers):
        for head in range(model.cfg.n_heads):
            by_hand = _atp_star_head_by_hand(model, corrupted_t, clean_cache, layer, head)
            assert float(star[grid][layer, head]) == pytest.approx(by_hand, rel=tol["rtol"] * 10, abs=1e-9)
            moved = max(moved, abs(float(star[grid][layer, head] - plain[layer, head])))
    assert moved > 1e-3  # the QK fix changed something


def test_atp_star_on_one_grid_equals_that_grid_among_all_four():
    """The QK fix's probes read every block's input whichever grids were asked (a TransformerBridge
    records only the hooks a call names: a grid asked alone once lacked them)."""
    model = cached_model("llama")
    clean_t, corrupted_t, clean_cache, _ = runs(model)
    together = RP.relevance_patch(model, corrupted_t, clean_cache, metric, FOUR, method="atp_star")
    for g in FOUR:
        alone = RP.relevance_patch(model, corrupted_t, clean_cache, metric, [g], method="atp_star")
        assert alone.method[g] == together.method[g] == "atp*: gxi + QK fix"
        torch.testing.assert_close(alone[g], together[g], **tolerance(model), msg=g)
        assert float(alone[g].abs().max()) > 1e-3, g  # not a comparison of zeros


@pytest.mark.filterwarnings("ignore:uncertified model")  # the hand-made reference detaches outputs on purpose
def test_graddrop_gate_equals_detaching_that_layer():
    """GradDrop's gate on layer ℓ passes no gradient through ℓ's attention and MLP outputs: the same
    gradients as a forward whose layer-ℓ outputs are detached."""
    model = cached_model("gpt2")
    clean_t, corrupted_t, clean_cache, _ = runs(model)
    adapter = cage_lens.adapt(model)
    names = [f"blocks.{l}.hook_resid_pre" for l in range(model.cfg.n_layers)]
    drop = atp_star.GradDrop(adapter)
    tapped = tapped_run(model, adapter, corrupted_t, clean_cache, metric, names, names, resolve_patch_rules("gxi"),
                        extra_hooks=drop.hooks())
    for layer in range(model.cfg.n_layers):
        drop.state["drop"] = layer
        dropped = tapped.gradients(retain=True)
        drop.state["drop"] = None
        cut = [(f"blocks.{layer}.{h}", lambda t, hook: t.detach()) for h in ("hook_attn_out", "hook_mlp_out")]
        with model.hooks(fwd_hooks=cut):
            _, by_hand = gradients(model, adapter, corrupted_t, metric, names, resolve_patch_rules("gxi"), strict=False)
        for n in names:
            torch.testing.assert_close(dropped[n], by_hand[n], rtol=1e-12, atol=1e-14)
    assert hook_count(model) == 0
