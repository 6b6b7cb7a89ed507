"""Circuits: exact effects of every edge, the ground truth edge attribution is measured against.

- :func:`~fastpatch.circuits.exact_edges.exact_edges`: the metric change from patching each
  writer -> reader edge alone, every edge in one batched call, returned as the
  :class:`~fastpatch.attribution.EdgeScores` that ``fastpatch.attribution.get_attr_patch_edges``
  returns (same edge order, same ``top_edges`` / ``to_frame``).
- :func:`~fastpatch.circuits.evaluate.evaluate`: the metric of many circuits (edge masks in that
  order), each with every edge outside it ablated (MIB / EAP-IG ``evaluate_graph``), under several
  ablations, stacked along the batch dimension.
- :func:`~fastpatch.circuits.faithfulness.faithfulness_curve`: MIB's faithfulness curve of the top-n
  circuits of any edge score, with random baselines, normalised faithfulness, CPR and CMD.
- :mod:`~fastpatch.circuits.discovery`: greedy circuits (EAP-IG ``apply_greedy``) and an exact
  ACDC-style search whose candidate removals into a reader share one batched pass.
- :mod:`~fastpatch.circuits.plots`: the faithfulness-curve figure and the circuit graph figure (plotly).
"""

from fastpatch.circuits.discovery import AcdcResult, acdc, greedy_circuits
from fastpatch.circuits.evaluate import ABLATIONS, evaluate, full_circuit
from fastpatch.circuits.exact_edges import DIRECTIONS, exact_edges
from fastpatch.circuits.faithfulness import MIB_SIZES, FaithfulnessCurve, faithfulness_curve

__all__ = [
    "ABLATIONS", "DIRECTIONS", "MIB_SIZES", "AcdcResult", "FaithfulnessCurve", "acdc", "evaluate", "exact_edges",
    "faithfulness_curve", "full_circuit", "greedy_circuits",
]
