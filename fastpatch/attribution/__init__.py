"""Attribution patching: gradient-based (first-order) estimates of activation patching sweeps.

``get_attr_patch_<X>`` estimates ``fastpatch.patching.get_act_patch_<X>`` minus the corrupted
baseline from one clean forward, one corrupted forward and one backward; see
:mod:`fastpatch.attribution.nodes`.
"""

from fastpatch.attribution.nodes import *  # noqa: F401,F403
from fastpatch.attribution.nodes import __all__ as _nodes_all

__all__ = list(_nodes_all)
