"""Attribution patching: gradient-based (first-order) estimates of activation patching sweeps.

One shared pass module and one module per method:

- :mod:`~fastpatch.attribution.passes`: input checks, hook names, the zero-probe gradient pass,
  activation capture, the sweep table and its layer stacks, the integrated-gradients step schedule.
- :mod:`~fastpatch.attribution.nodes`: ``get_attr_patch_<X>`` estimates
  ``fastpatch.patching.get_act_patch_<X>`` minus the corrupted baseline from one clean forward,
  one corrupted forward and one backward.
- :mod:`~fastpatch.attribution.integrated_gradients`: ``get_attr_patch_ig``.
- :mod:`~fastpatch.attribution.atpstar`: AtP*'s QK fix (query/key patches through saturated softmaxes).
- :mod:`~fastpatch.attribution.graddrop`: GradDrop, AtP*'s fix against cancelling direct and
  indirect effects.
- :mod:`~fastpatch.attribution.verification`: ``verify``, the top-k cells of an estimate measured
  by exact batched patching.
- :mod:`~fastpatch.attribution.edges`: every writer -> later reader score from the same three passes.
- :mod:`~fastpatch.attribution.stop_gradient`: node attribution with stop-gradients (frozen norm
  scales or attention patterns, the effect not mediated by chosen hook points) and at a run
  intervened on first (``attribute_nodes_variant``, ``get_attr_patch_variant``).
- :mod:`~fastpatch.attribution.attention`: attention attribution on one batch of prompts, no
  corrupted run: ``pattern * gradient`` per ``(layer, head, dest, src)``, optionally integrated
  (Hao et al. 2021).
"""

from fastpatch.attribution import atpstar, attention, graddrop, integrated_gradients, nodes, stop_gradient, verification
from fastpatch.attribution.atpstar import *  # noqa: F401,F403
from fastpatch.attribution.attention import *  # noqa: F401,F403
from fastpatch.attribution.edges import EdgeScores, get_attr_patch_edges
from fastpatch.attribution.graddrop import *  # noqa: F401,F403
from fastpatch.attribution.integrated_gradients import *  # noqa: F401,F403
from fastpatch.attribution.nodes import *  # noqa: F401,F403
from fastpatch.attribution.stop_gradient import *  # noqa: F401,F403
from fastpatch.attribution.verification import *  # noqa: F401,F403

__all__ = (
    list(nodes.__all__)
    + list(integrated_gradients.__all__)
    + list(atpstar.__all__)
    + list(graddrop.__all__)
    + list(verification.__all__)
    + list(attention.__all__)
    + list(stop_gradient.__all__)
    + ["EdgeScores", "get_attr_patch_edges"]
)
