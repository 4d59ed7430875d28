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

__all__ = [
    "Architecture", "Attribution", "CageLensError", "ConservationReport", "InputError", "ModelAdapter",
    "NeuronRelevance", "NumericalError", "RULE_SETS", "TARGET_MODES", "UnsupportedModelError", "adapt",
    "attribute", "from_hf_model", "load_hf_directory", "lrp",
]
