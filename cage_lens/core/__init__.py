"""The LRP core: rule sets, the hooks that realise them, the engine that runs them, the certificate
that vouches for them (docs/rules.md).

The core is eleven modules in layers; each imports only modules of the layers below it (never one
above, not even inside a function — ``tests/test_layout.py`` checks it):

0. :mod:`~cage_lens.core.memory` — a device's free memory (torch imported only for CUDA), which the
   planner and the certificate read.
1. :mod:`~cage_lens.core.rulesets` — rule sets as data: :class:`RuleSet` (the q/k/v factors, the
   gated split, the norm / activation / soft-cap / router choices), the built-ins ``"attnlrp"``,
   ``"cplrp"``, ``"gxi"`` and their resolution from a name. **A rule factor lives here.**
2. :mod:`~cage_lens.core.autograd` — the autograd pieces that apply one factor each (forward values
   untouched, local gradients changed).
3. :mod:`~cage_lens.core.precision` — unit roundoffs, the rounding error model, exact float32
   copies of bfloat16/float16 models (the certificate's probe, ``precision="float32"``).
4. :mod:`~cage_lens.core.adapter` — one view of any TransformerLens model: architecture facts, the
   sites of norms, attention and MLPs, the hook names that exist.
5. :mod:`~cage_lens.core.hooks` — hook records (``PointHook``, ``ModuleHook``, ``ModulePreHook``),
   their per-call, thread-guarded installation, the per-model lock, which hook points fire.
6. :mod:`~cage_lens.core.realise` — a rule set on one model: the hooks that put every factor of a
   :class:`RuleSet` on that model's sites. **This is who installs a rule factor** (through the engine).
7. :mod:`~cage_lens.core.recompute` — the long-context mode: blocks recomputed in the backward,
   attention computed in row chunks (docs/long_context.md).
8. :mod:`~cage_lens.core.engine` — rule sets active per thread (nesting), capture of activations,
   the one gradient call, finiteness checks.
9. :mod:`~cage_lens.core.certificate` — the completeness certificate: CP-LRP's conservation identity
   and a walk of the module tree. **This is who checks the rules cover the model**; callers run
   :func:`~cage_lens.core.certificate.certify_or_warn` before they use the engine.
10. :mod:`~cage_lens.core.api` — the public context managers ``cage_lens.lrp`` and
   ``cage_lens.rule_hooks``.

Everything above the core (``attribute``, graphs, CAGE, patching, studies) imports from it; nothing
in it imports from above.
"""
