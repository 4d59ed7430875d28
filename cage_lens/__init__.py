"""cage_lens: relevance explanations for TransformerLens models.

>>> import cage_lens
>>> attr = cage_lens.attribute(model, "When Mary and John went to the store, John gave a drink to",
...                            target=" Mary", contrast=" John")
>>> attr.token_relevance          # [batch, pos]
>>> with cage_lens.lrp(model, "attnlrp"):   # any TL workflow under the LRP rules
...     logits, cache = model.run_with_cache(tokens)

Every public name is imported on first use (PEP 562), so ``import cage_lens`` and ``cage-lens --help``
do not pay for importing torch and TransformerLens.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

#: public name -> the module defining it; a name whose value is a module maps to that module itself
_EXPORTS = {
    "Architecture": "cage_lens.core.adapter",
    "ModelAdapter": "cage_lens.core.adapter",
    "adapt": "cage_lens.core.adapter",
    "RULE_SETS": "cage_lens.core.rulesets",
    "RuleSet": "cage_lens.core.rulesets",
    "lrp": "cage_lens.core.api",
    "rule_hooks": "cage_lens.core.api",
    "Attribution": "cage_lens.attribution",
    "ConservationReport": "cage_lens.attribution",
    "NeuronRelevance": "cage_lens.attribution",
    "attribute": "cage_lens.attribution",
    "estimate": "cage_lens.planning",
    "Estimate": "cage_lens.planning",
    "CageLensError": "cage_lens.errors",
    "InputError": "cage_lens.errors",
    "NumericalError": "cage_lens.errors",
    "UnsupportedModelError": "cage_lens.errors",
    "InsufficientMemoryError": "cage_lens.errors",
    "from_hf_model": "cage_lens.loading",
    "load_hf_directory": "cage_lens.loading",
    "TARGET_MODES": "cage_lens.targets",
    "cage": "cage_lens.generation.graph",
    "GenerationGraph": "cage_lens.generation.graph",
    "circuit_graph": "cage_lens.circuit.builder",
    "CircuitGraph": "cage_lens.circuit.graph",
    "explain_failure": "cage_lens.failure",
    "FailureExplanation": "cage_lens.failure",
    "load": "cage_lens.persist",
    "methods": "cage_lens.generation.methods",
    "metrics": "cage_lens.metrics",
    "patching": "cage_lens.patching",
    "study": "cage_lens.study",
    "zoo": "cage_lens.zoo",
}
_MODULES = {"methods", "metrics", "patching", "study", "zoo"}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'cage_lens' has no attribute {name!r}")
    module = importlib.import_module(_EXPORTS[name])
    value = module if name in _MODULES else getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
