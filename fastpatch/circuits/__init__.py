"""Circuits: exact effects of every edge, the ground truth edge attribution is measured against.

- :func:`~fastpatch.circuits.exact_edges.exact_edges`: the metric change from patching each
  writer -> reader edge alone, every edge in one batched call, returned as the
  :class:`~fastpatch.attribution.EdgeScores` that ``fastpatch.attribution.get_attr_patch_edges``
  returns (same edge order, same ``top_edges`` / ``to_frame``).
- :func:`~fastpatch.circuits.evaluate.evaluate`: the metric of many circuits (edge masks in that
  order), each with every edge outside it ablated (MIB / EAP-IG ``evaluate_graph``), under several
  ablations, stacked along the batch dimension.
"""

from fastpatch.circuits.evaluate import ABLATIONS, evaluate, full_circuit
from fastpatch.circuits.exact_edges import DIRECTIONS, exact_edges

__all__ = ["ABLATIONS", "DIRECTIONS", "evaluate", "exact_edges", "full_circuit"]
