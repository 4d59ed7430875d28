"""cage_lens: relevance explanations for TransformerLens models.

>>> import cage_lens
>>> attr = cage_lens.attribute(model, "When Mary and John went to the store, John gave a drink to",
...                            target=" Mary", contrast=" John")
>>> attr.token_relevance          # [batch, pos]
>>> with cage_lens.lrp(model, "attnlrp"):   # any TL workflow under the LRP rules
...     logits, cache = model.run_with_cache(tokens)
"""

from cage_lens.adapter import Architecture, ModelAdapter, adapt
from cage_lens.attribution import Attribution, ConservationReport, NeuronRelevance, attribute
from cage_lens.errors import CageLensError, InputError, NumericalError, UnsupportedModelError
from cage_lens.loading import from_hf_model, load_hf_directory
from cage_lens.rules import RULE_SETS, lrp
from cage_lens.targets import TARGET_MODES

__version__ = "0.1.0"

# Heavier features are imported on first use: ``cage_lens.cage(...)``, ``cage_lens.circuit_graph(...)``.
_LAZY = {
    "cage": ("cage_lens.cage_graph", "cage"),
    "GenerationGraph": ("cage_lens.cage_graph", "GenerationGraph"),
    "circuit_graph": ("cage_lens.circuit", "circuit_graph"),
    "CircuitGraph": ("cage_lens.circuit", "CircuitGraph"),
    "explain_failure": ("cage_lens.failure", "explain_failure"),
    "FailureExplanation": ("cage_lens.failure", "FailureExplanation"),
    "methods": ("cage_lens.methods", None),
    "metrics": ("cage_lens.metrics", None),
    "patching": ("cage_lens.patching", None),
    "zoo": ("cage_lens.zoo", None),
}


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module 'cage_lens' has no attribute {name!r}")
    import importlib

    module_name, attr = _LAZY[name]
    module = importlib.import_module(module_name)
    value = module if attr is None else getattr(module, attr)
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + list(_LAZY))

__all__ = [
    "Architecture", "Attribution", "CageLensError", "ConservationReport", "InputError", "ModelAdapter",
    "NeuronRelevance", "NumericalError", "RULE_SETS", "TARGET_MODES", "UnsupportedModelError", "adapt",
    "attribute", "from_hf_model", "load_hf_directory", "lrp", *_LAZY,
]
