"""Rule sets as data, and every factor of every rule pinned by a hand-derived identity (docs/rules.md).

Each test captures the same activation on both sides of a rule — the tensor entering it (a capture
installed ahead of the rules) and the tensor leaving it — and checks the rule's defining equation
with the factor written out literally: ``∂f/∂q_in = ¼ ∂f/∂q_out`` for AttnLRP's queries, ``R_gate =
R_up = ½ R_product`` for its gated MLP, ``R_pre = R_post`` for the identity rule on an activation, the
scale-frozen Jacobian for every norm, ``∂f/∂q = Σ (g·post/pre) k s`` through a soft-capped score,
``u·∂f/∂u = f`` through a soft-capped logit, a zero gradient into detached queries, keys, gates and
router weights. Changing any factor of a built-in rule set fails one of these tests on both TL lines.
"""

from __future__ import annotations

import functools
import weakref

import pytest
import torch

import cage_lens
from cage_lens.core import engine
from cage_lens.core.adapter import adapt
from cage_lens.circuit.builder import circuit_graph
from cage_lens.core.hooks import ModuleHook, ModulePreHook, PointHook, installed, session
from cage_lens.errors import CageLensError, InputError
from cage_lens.core.rulesets import ATTNLRP, CPLRP, GXI, RULE_SETS, RuleSet, resolve_rules
from cage_lens.core.api import rule_hooks
from cage_lens.testing import random_model, supported_families
from conftest import hook_count

PROMPT = "the cat sat on the mat and the dog"
TARGET = 7



@functools.lru_cache(maxsize=None)
def family_model(family: str, n_layers: int = 1):
    return random_model(family, n_layers=n_layers, biases=True)


def close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-10) -> bool:
    return bool(((a - b).abs().max() <= rtol * max(float(b.abs().max()), float(a.abs().max()), 1e-30)).item())


def captured_gradients(model, rules, before=(), after=(), modules=()):
    """Gradients of logit[TARGET] at the last position w.r.t. activations captured ahead of the
    rules (``before``), behind them (``after``) and at module inputs/outputs (``modules``: (key,
    module, "input"|"output")); returns (values, gradients, target value)."""
    adapter = adapt(model)
    tensors: dict = {}

    def keep(key):
        def hook(tensor, hook):
            tensors[key] = tensor
            return tensor
        return hook

    calls: dict = {}

    def keep_input(key):  # a module may run several times (experts): every call is kept
        def hook(module, args, kwargs):
            x = args[0].view_as(args[0])
            tensors[(key, len(calls.setdefault(key, [])))] = x
            calls[key].append(x)
            return (x,) + tuple(args[1:]), kwargs
        return hook

    def keep_output(key):
        def hook(module, args, kwargs, out):
            tensors[(key, len(calls.setdefault(key, [])))] = out
            calls[key].append(out)
        return hook

    hooks = [PointHook(n, keep(("before", n)), first=True) for n in before]
    hooks += [PointHook(n, keep(("after", n))) for n in after]
    hooks += [ModulePreHook(m, keep_input(k)) if side == "input" else ModuleHook(m, keep_output(k))
              for k, m, side in modules]
    tokens = model.to_tokens(PROMPT)
    with session(adapter), engine.rules_active(adapter, rules), installed(adapter, hooks):
        value = model(tokens)[0, -1, TARGET]
        grads = engine.gradients(value, tensors)
    values = {k: t.detach() for k, t in tensors.items()}
    for key, found in calls.items():  # module captures: one call → its tensors; several → concatenated
        values[key] = torch.cat([values[(key, i)].reshape(-1, found[i].shape[-1]) for i in range(len(found))])
        grads[key] = torch.cat([grads[(key, i)].reshape(-1, found[i].shape[-1]) for i in range(len(found))])
        if len(found) == 1:
            values[key], grads[key] = values[(key, 0)], grads[(key, 0)]
    return values, grads, float(value.detach())


# ---------------------------------------------------------------------------- the data
def test_built_in_rule_sets_are_the_published_ones():
    assert set(RULE_SETS) == {"attnlrp", "cplrp", "gxi"}
    assert resolve_rules("AttnLRP") is ATTNLRP and resolve_rules(CPLRP) is CPLRP
    assert CPLRP.freezes_every_nonlinearity and not ATTNLRP.freezes_every_nonlinearity
    assert GXI.is_plain_gradient and not ATTNLRP.is_plain_gradient
    assert RuleSet.from_dict(ATTNLRP.to_dict()) == ATTNLRP


@pytest.mark.parametrize("bad, message", [
    (dict(name=""), "non-empty name"),
    (dict(name="x", q=float("nan")), "q must be a finite number"),
    (dict(name="x", v="half"), "v must be a finite number"),
    (dict(name="x", norm="epsilon"), "norm must be one of identity, gradient"),
    (dict(name="x", router="soft"), "router must be one of constant, gradient"),
])
def test_bad_rule_sets_are_refused(bad, message):
    with pytest.raises(InputError, match=message):
        RuleSet(**bad)
    with pytest.raises(InputError, match="unknown rule set 'lrp-eps'"):
        resolve_rules("lrp-eps")


# ---------------------------------------------------------------------------- attention factors
ATTENTION_FACTORS = {"attnlrp": (0.25, 0.25, 0.5), "cplrp": (0.0, 0.0, 1.0), "gxi": (1.0, 1.0, 1.0)}


@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen3"])
@pytest.mark.parametrize("rules", sorted(ATTENTION_FACTORS))
def test_query_key_value_gradient_factors(family, rules):
    model = family_model(family)
    site = adapt(model).layer(0)
    points = [site.q, site.k, site.v]
    _, grads, _ = captured_gradients(model, rules, before=points, after=points)
    for point, factor in zip(points, ATTENTION_FACTORS[rules]):
        g_in, g_out = grads[("before", point)], grads[("after", point)]
        if factor == 0.0:  # detached: nothing reaches the projection
            assert torch.equal(g_in, torch.zeros_like(g_in)), point
        else:
            assert float(g_out.abs().max()) > 1e-6, point
            assert close(g_in, factor * g_out), (point, factor)


# ---------------------------------------------------------------------------- gated MLPs
GATED_SHARES = {"attnlrp": (0.5, 0.5), "cplrp": (0.0, 1.0)}


def _gated_relevance(model, rules, mlp):
    before = [mlp.pre, mlp.pre_linear]
    values, grads, _ = captured_gradients(model, rules, before=before, after=[mlp.post])
    r_gate = values[("before", mlp.pre)] * grads[("before", mlp.pre)]
    r_up = values[("before", mlp.pre_linear)] * grads[("before", mlp.pre_linear)]
    r_post = values[("after", mlp.post)] * grads[("after", mlp.post)]
    return r_gate, r_up, r_post


@pytest.mark.parametrize("family", ["llama", "gemma2"])
@pytest.mark.parametrize("rules", sorted(GATED_SHARES))
def test_gated_mlp_split_with_identity_on_the_activation(family, rules):
    """Uniform rule on ``act(gate)·up`` with the identity rule through ``act``: each factor receives
    its share of the product's relevance, neuron by neuron."""
    model = family_model(family)
    r_gate, r_up, r_post = _gated_relevance(model, rules, adapt(model).layer(0).mlp)
    gate_share, up_share = GATED_SHARES[rules]
    assert float(r_post.abs().max()) > 1e-6
    assert close(r_gate, gate_share * r_post) and close(r_up, up_share * r_post)


def test_gated_mlp_under_plain_gradient_is_not_split():
    model = family_model("llama")
    r_gate, r_up, r_post = _gated_relevance(model, "gxi", adapt(model).layer(0).mlp)
    assert not close(r_gate + r_up, r_post, rtol=1e-3)  # Gradient×Input does not conserve here


@pytest.mark.parametrize("family", ["gpt2", "opt", "bloom"])
def test_identity_rule_on_element_wise_activations(family):
    """``R_pre = R_post`` through the activation. For ReLU (OPT) Gradient×Input is the identity rule
    already (``x·relu'(x) = relu(x)``); for GELU it is not."""
    model = family_model(family)
    mlp = adapt(model).layer(0).mlp
    for rules, identity in (("attnlrp", True), ("cplrp", True), ("gxi", family == "opt")):
        values, grads, _ = captured_gradients(model, rules, before=[mlp.pre], after=[mlp.post])
        r_pre = values[("before", mlp.pre)] * grads[("before", mlp.pre)]
        r_post = values[("after", mlp.post)] * grads[("after", mlp.post)]
        assert close(r_pre, r_post) == identity, rules


# ---------------------------------------------------------------------------- norms
@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen3", "gemma2"])
def test_every_norm_holds_its_scale_constant(family):
    """For every normalisation module (q/k norms and post-norms included): the gradient at its input
    is the scale-frozen Jacobian applied to the gradient at its output — ``g·post/x`` for RMSNorm,
    ``C(g·(post − b)/Cx)`` for LayerNorm (``C`` centring) — under AttnLRP and CP-LRP, and not under
    plain Gradient×Input."""
    model = family_model(family)
    sites = adapt(model).norm_sites
    assert len(sites) >= 3
    modules = [(("in", s.path), s.module, "input") for s in sites] + [(("out", s.path), s.module, "output") for s in sites]
    for rules, identity in (("attnlrp", True), ("cplrp", True), ("gxi", False)):
        values, grads, _ = captured_gradients(model, rules, modules=modules)
        for site in sites:
            if ("out", site.path) not in grads:
                continue  # a norm the forward does not reach at this target (none here)
            x, out = values[("in", site.path)], values[("out", site.path)]
            g_in, g_out = grads[("in", site.path)], grads[("out", site.path)]
            if site.centred:
                centred = x - x.mean(-1, keepdim=True)
                bias = 0 if site.bias is None else site.bias.detach()
                scaled = g_out * (out - bias) / centred
                expected = scaled - scaled.mean(-1, keepdim=True)
            else:
                expected = g_out * out / x
            if float(g_out.abs().max()) == 0.0 or (rules == "cplrp" and float(g_in.abs().max()) == 0.0):
                continue  # CP-LRP detaches q and k ahead of their norms: nothing reaches those inputs
            assert close(g_in, expected, rtol=1e-8) == identity, (rules, site.path)


# ---------------------------------------------------------------------------- soft-caps (Gemma-2)
@pytest.mark.skipif("gemma2" not in supported_families(), reason="no Gemma-2 conversion on this TL line")
def test_attention_soft_cap_passes_gradient_times_post_over_pre():
    model = family_model("gemma2")
    adapter = adapt(model)
    site = adapter.layer(0)
    cap, scale = site.attn_softcap, adapter.score_scale(0)
    values, grads, _ = captured_gradients(model, "attnlrp", before=[site.rot_q, site.rot_k], after=[site.attn_scores])
    q, k = values[("before", site.rot_q)][0], values[("before", site.rot_k)][0]       # [pos, head, d]
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    pre = torch.einsum("qhd,khd->hqk", q, k) * scale
    post = cap * torch.tanh(pre / cap)
    causal = torch.ones(pre.shape[-2:], dtype=torch.bool).tril()
    g_post = grads[("after", site.attn_scores)][0]
    identity = torch.where(causal, g_post * post / pre, torch.zeros_like(pre))
    expected = torch.einsum("hqk,khd->qhd", identity, k) * scale
    assert float((pre.abs() * causal).max()) > 0.3 * cap  # the cap really bends at this init scale
    assert close(grads[("before", site.rot_q)][0], expected, rtol=1e-9)


@pytest.mark.skipif("gemma2" not in supported_families(), reason="no Gemma-2 conversion on this TL line")
def test_final_logit_soft_cap_passes_the_capped_logit():
    """Identity rule on ``c·tanh(u/c)``: the relevance of the uncapped logit is the capped one."""
    model = family_model("gemma2")
    adapter = adapt(model)
    tokens = model.to_tokens(PROMPT)
    store = {}

    def grab(module, args, output):
        store["u"] = output
    handle = model.unembed.register_forward_hook(grab, prepend=True)  # ahead of the rules' own hook
    try:
        with torch.no_grad():
            model(tokens)
        target = int(store["u"][0, -1].abs().argmax())  # the most capped logit
        for rules, identity in (("attnlrp", True), ("cplrp", True), ("gxi", False)):
            with session(adapter), engine.rules_active(adapter, rules):
                f = model(tokens)[0, -1, target]
                (g,) = torch.autograd.grad(f, store["u"])
            u, f = float(store["u"][0, -1, target].detach()), float(f.detach())
            relevance = u * float(g[0, -1, target])
            assert abs(u) > abs(f) * 1.05  # the cap really bends at this init scale
            assert (abs(relevance - f) < 1e-12 * abs(f)) == identity, rules
    finally:
        handle.remove()
    assert hook_count(model) == 0


# ---------------------------------------------------------------------------- mixture of experts
@pytest.mark.parametrize("family", ["mixtral"])
def test_router_weights_are_constant(family):
    model = family_model(family)
    router = adapt(model).layer(0).mlp.router
    for rules, constant in (("attnlrp", True), ("cplrp", True), ("gxi", False)):
        _, grads, _ = captured_gradients(model, rules, before=[router])
        g = grads[("before", router)]
        assert (float(g.abs().max()) == 0.0) == constant, rules


@pytest.mark.parametrize("family", ["mixtral"])
def test_expert_gate_receives_its_share(family):
    """Each selected expert is a gated MLP under the uniform rule: summed over experts and tokens,
    the gate pre-activations hold ``gate`` of the relevance of what the experts add to the residual
    (TL-native experts expose hooks; a fused Hugging Face experts module is read at its activation
    module and its output)."""
    model = family_model(family)
    mlp = adapt(model).layer(0).mlp
    for rules, share in (("attnlrp", 0.5), ("cplrp", 0.0)):
        if mlp.fused_experts is not None:
            modules = [("gate", mlp.fused_act, "input"), ("out", mlp.fused_experts, "output")]
            values, grads, _ = captured_gradients(model, rules, modules=modules)
            r_gate = float((values["gate"] * grads["gate"]).sum())
            r_out = float((values["out"] * grads["out"]).sum())
        else:
            gates = [e.pre for e in mlp.experts]
            values, grads, _ = captured_gradients(model, rules, before=gates, modules=[("out", mlp.module, "output")])
            r_gate = sum(float((values[("before", n)] * grads[("before", n)]).sum()) for n in gates if ("before", n) in values)
            r_out = float((values["out"] * grads["out"]).sum())
        assert abs(r_out) > 1e-6
        assert abs(r_gate - share * r_out) < 1e-10 * abs(r_out), rules


# ---------------------------------------------------------------------------- a variant of one's own
UNIFORM = RuleSet("uniform1", q=1, k=1, v=1, gate=0.5, up=0.5)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_a_custom_rule_set_gets_token_head_and_graph_views(family):
    model = family_model(family, n_layers=2)
    a = cage_lens.attribute(model, PROMPT, target=TARGET, rules=UNIFORM)
    assert a.rules == "uniform1" and a.rule_set == UNIFORM and a.meta["settings"]["rules"] == UNIFORM.to_dict()
    for reference in ("attnlrp", "gxi"):
        other = cage_lens.attribute(model, PROMPT, target=TARGET, rules=reference).token_relevance
        assert not torch.allclose(a.token_relevance, other, rtol=1e-3)
    layer_heads = a.head_relevance[0].sum(1)                        # [layer, pos]
    assert torch.isfinite(layer_heads).all() and float(layer_heads.abs().max()) > 1e-6
    fast = circuit_graph(model, PROMPT, TARGET, rules=UNIFORM, levels="heads", node_threshold=None, top_p=None)
    ref = circuit_graph(model, PROMPT, TARGET, rules=UNIFORM, levels="heads", method="autograd", batch_size=64,
                        node_threshold=None, top_p=None)
    assert fast.rules == "uniform1" and fast.rule_set == UNIFORM
    for es in fast.edge_sets:
        assert close(fast.edge_matrix(es.source, es.target), ref.edge_matrix(es.source, es.target), rtol=1e-5)
    # the graph's first level carries the attribution's input relevance
    assert close(fast.node_relevance("embeddings"), a.node_relevance["blocks.0.hook_resid_pre"][0], rtol=1e-5)


def test_rule_hooks_compose_with_model_hooks():
    model = family_model("gpt2")
    tokens = model.to_tokens(PROMPT)
    store = {}

    def root(t, hook):
        t = t.detach().requires_grad_(True)
        store["x"] = t
        return t

    with model.hooks(fwd_hooks=rule_hooks(model, "attnlrp") + [(adapt(model).embed_hook, root)]):
        value = model(tokens)[0, -1, TARGET]
    (g,) = torch.autograd.grad(value, store["x"])
    mine = (store["x"] * g).sum(-1)[0].detach()
    ours = cage_lens.attribute(model, tokens, target=TARGET).token_relevance[0]
    assert close(mine, ours, rtol=1e-12)
    assert hook_count(model) == 0


@pytest.mark.skipif("mixtral" not in supported_families(), reason="no Mixtral conversion on this TL line")
def test_rule_hooks_name_what_needs_a_module_hook():
    model = family_model("mixtral")
    if adapt(model).layer(0).mlp.fused_experts is None:
        assert rule_hooks(model, "attnlrp")  # TL-native experts: every rule sits on a hook point
    else:
        with pytest.raises(CageLensError, match="needs a module-level hook on .*use `with cage_lens.lrp"):
            rule_hooks(model, "attnlrp")


# ---------------------------------------------------------------------------- nesting
def test_rules_inside_an_active_block_are_applied_once():
    model = family_model("gpt2", n_layers=2)
    outside = cage_lens.attribute(model, PROMPT, target=TARGET, rules="attnlrp").token_relevance
    with cage_lens.lrp(model, "attnlrp"):
        inside = cage_lens.attribute(model, PROMPT, target=TARGET, rules="attnlrp").token_relevance
        with cage_lens.lrp(model, "attnlrp"):
            nested = cage_lens.attribute(model, PROMPT, target=TARGET, rules="attnlrp").token_relevance
    assert torch.equal(inside, outside) and torch.equal(nested, outside)
    assert hook_count(model) == 0


def test_different_rules_inside_an_active_block_are_refused():
    model = family_model("gpt2", n_layers=2)
    with cage_lens.lrp(model, "attnlrp"):
        with pytest.raises(CageLensError, match="rules='gxi' was requested inside an active cage_lens.lrp"):
            cage_lens.attribute(model, PROMPT, target=TARGET, rules="gxi")
        with pytest.raises(CageLensError, match="rules='cplrp' was requested inside"):
            with cage_lens.lrp(model, "cplrp"):
                pass
        with pytest.raises(CageLensError, match="inside an active"):
            circuit_graph(model, PROMPT, TARGET, rules="cplrp")
    assert hook_count(model) == 0
    # and the block still works after the refusals
    assert torch.isfinite(cage_lens.attribute(model, PROMPT, target=TARGET, rules="gxi").token_relevance).all()


# ---------------------------------------------------------------------------- torch modes
def test_inference_mode_and_no_grad_give_the_same_relevance():
    model = family_model("llama", n_layers=2)
    expected = cage_lens.attribute(model, PROMPT, target=TARGET).token_relevance
    with torch.inference_mode():
        tokens = model.to_tokens(PROMPT)
        inside = cage_lens.attribute(model, tokens, target=TARGET).token_relevance
        graph = circuit_graph(model, tokens, TARGET, node_threshold=None, top_p=None)
    with torch.no_grad():
        no_grad = cage_lens.attribute(model, PROMPT, target=TARGET).token_relevance
    assert torch.equal(inside, expected) and torch.equal(no_grad, expected)
    assert close(graph.node_relevance("embeddings"), cage_lens.attribute(model, PROMPT, target=TARGET)
                 .node_relevance["blocks.0.hook_resid_pre"][0], rtol=1e-9)


# ---------------------------------------------------------------------------- memory (docs/rules.md#memory)
def _saved_bytes(call, monkeypatch) -> int:
    """Bytes of the distinct storages autograd holds for the backward at the moment the backward starts
    (every tensor saved during the forward that is still alive then): what a backward keeps, independent
    of the allocator and of the machine's load."""
    saved, at_backward = [], []
    real_grad = torch.autograd.grad

    def pack(tensor):
        saved.append(weakref.ref(tensor))
        return tensor

    def grad(*args, **kwargs):
        live = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in (r() for r in saved) if t is not None}
        at_backward.append(sum(live.values()))
        return real_grad(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", grad)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        call()
    monkeypatch.setattr(torch.autograd, "grad", real_grad)
    (size,) = at_backward
    return size


def _bare_gradient_x_input(model, tokens) -> None:
    store = {}

    def root(tensor, hook):
        store["embed"] = tensor.detach().requires_grad_(True)
        return store["embed"]

    embed = "embed.hook_out" if "embed.hook_out" in model.hook_dict else "hook_embed"
    with model.hooks(fwd_hooks=[(embed, root)]):
        logits = model(tokens)
    torch.autograd.grad(logits[0, -1, 5], store["embed"])


@pytest.mark.parametrize("family", ["llama", "qwen3", "gpt2"])
def test_an_attribution_keeps_no_more_than_a_plain_backward(family, monkeypatch):
    """What autograd holds per layer when the backward starts (a 4-layer model minus a 2-layer one,
    float32), ``attribute`` against bare gradient × input: AttnLRP measured 0.87–0.96×, CP-LRP
    0.62–0.82× on both TL lines. A rule factor formed with autograd history (the gated MLP's
    ``act/gate`` once kept ``gate``, ``act`` and the quotient alive) makes AttnLRP 1.05–1.08×."""
    per_layer = {}
    for n_layers in (2, 4):
        model = random_model(family, n_layers=n_layers, d_model=64, dtype=torch.float32, init_scale=0.02)
        tokens = model.to_tokens(" ".join([PROMPT] * 3))
        cage_lens.attribute(model, tokens, target=5)  # certificate and probes outside the measurement
        per_layer[n_layers] = {
            "bare": _saved_bytes(lambda: _bare_gradient_x_input(model, tokens), monkeypatch),
            "attnlrp": _saved_bytes(lambda: cage_lens.attribute(model, tokens, target=5, rules="attnlrp"), monkeypatch),
            "cplrp": _saved_bytes(lambda: cage_lens.attribute(model, tokens, target=5, rules="cplrp"), monkeypatch),
        }
    cost = {k: (per_layer[4][k] - per_layer[2][k]) / 2 for k in per_layer[2]}
    ratios = (cost["attnlrp"] / cost["bare"], cost["cplrp"] / cost["bare"])
    assert ratios[0] <= 1.0 and ratios[1] <= 0.85, ratios


def test_identity_pieces_keep_no_tensor_of_their_own():
    """``ElementwiseIdentity`` and ``CenteredIdentity`` save their inputs ``pre``/``x`` and ``post``
    (which autograd keeps anyway) and form the ratio in the backward, bit for bit the ratio they used to
    save: a saved ratio would be one more ``[pos, d]`` tensor per norm until the backward."""
    from cage_lens.core.autograd import CenteredIdentity, ElementwiseIdentity, safe_ratio

    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    post = (torch.tanh(x) * 1.5).detach()
    bias = torch.full((5,), 0.25, dtype=torch.float64)
    centred_post = ((x - x.mean(-1, keepdim=True)) * 0.7 + bias).detach()
    grad = torch.randn(3, 5, dtype=torch.float64)
    for piece, args, factor in [(ElementwiseIdentity, (x, post, 2.0), lambda: safe_ratio(post, x) * 2.0),
                                (CenteredIdentity, (x, centred_post, bias), None)]:
        packed = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t, lambda t: t):
            out = piece.apply(*args)
        inputs = {a.untyped_storage().data_ptr() for a in args if isinstance(a, torch.Tensor)}
        assert packed and {t.untyped_storage().data_ptr() for t in packed} <= inputs
        (g,) = torch.autograd.grad(out, x, grad)
        if factor is not None:
            assert torch.equal(g, grad * factor().detach())
        else:
            scaled = grad * safe_ratio(centred_post - bias, x.detach() - x.detach().mean(-1, keepdim=True))
            assert torch.equal(g, scaled - scaled.mean(-1, keepdim=True))
