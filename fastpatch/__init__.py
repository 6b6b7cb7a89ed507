"""fastpatch: batched, exact, fast activation patching for TransformerLens models.

``from fastpatch import patching`` is a drop-in for ``transformer_lens.patching``.
"""

from fastpatch import attribution, metrics, patching
from fastpatch.engine.model_state import hook_count, model_flags
from fastpatch.engine.stats import last_run_stats
from fastpatch.patching import PatchingResult

__version__ = "0.1.0"

__all__ = ["patching", "attribution", "metrics", "PatchingResult", "hook_count", "model_flags", "last_run_stats", "__version__"]
