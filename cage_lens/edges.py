"""Former home of the cross-layer edge machinery, now the :mod:`cage_lens.graph` package (levels,
state, closed form, reference); kept so that ``from cage_lens import edges`` keeps working."""

from cage_lens.graph import *  # noqa: F401,F403
from cage_lens.graph import __all__  # noqa: F401
