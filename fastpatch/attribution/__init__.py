"""Attribution patching: gradient-based (first-order) estimates of activation patching sweeps.

``get_attr_patch_<X>`` estimates ``fastpatch.patching.get_act_patch_<X>`` minus the corrupted
baseline from one clean forward, one corrupted forward and one backward; see
:mod:`fastpatch.attribution.nodes`. Refinements (:mod:`fastpatch.attribution.refine`): integrated
gradients, the AtP* fixes (query/key patches through saturated softmaxes; GradDrop against
cancelling direct and indirect effects), and ``verify`` (the top-k cells of an estimate measured by
exact batched patching). Edges (:mod:`fastpatch.attribution.edges`): every writer -> later reader
score from the same three passes. Attention attribution on one batch of prompts, no corrupted run
(:mod:`fastpatch.attribution.attention`): ``pattern * gradient`` per ``(layer, head, dest, src)``,
optionally integrated (Hao et al. 2021).
"""

from fastpatch.attribution.nodes import *  # noqa: F401,F403
from fastpatch.attribution.nodes import __all__ as _nodes_all
from fastpatch.attribution.edges import EdgeScores, get_attr_patch_edges
from fastpatch.attribution.refine import *  # noqa: F401,F403
from fastpatch.attribution.refine import __all__ as _refine_all
from fastpatch.attribution.attention import *  # noqa: F401,F403
from fastpatch.attribution.attention import __all__ as _attention_all

__all__ = list(_nodes_all) + list(_refine_all) + list(_attention_all) + ["EdgeScores", "get_attr_patch_edges"]
