"""Plotly figures of circuits: the faithfulness curve, and the circuit as a graph by layer.

Both return plotly figures that ``fastpatch.figures.write_report`` takes as report sections.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from fastpatch.circuits.faithfulness import FaithfulnessCurve, _node_maps
from fastpatch.engine.edge_plan import edge_layout
from fastpatch.figures import _plotly

__all__ = ["faithfulness_figure", "circuit_graph_figure"]


def faithfulness_figure(curve: FaithfulnessCurve, log_x: bool = True, title: str = "Faithfulness curve"):
    """Normalised faithfulness against the fraction of edges, one line per ablation (CPR / CMD in its
    legend entry), each random baseline's mean over draws dashed in the same colour."""
    go = _plotly()
    fig = go.Figure()
    palette = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"]
    order = torch.argsort(curve.counts, stable=True)
    x = curve.fractions.cpu()[order]
    edges = curve.n_edges.cpu()[order]
    for a, name in enumerate(curve.ablations):
        colour = palette[a % len(palette)]
        fig.add_trace(go.Scatter(
            x=x.tolist(), y=curve.faithfulness[a].cpu()[order].tolist(), mode="lines+markers", line={"color": colour},
            name=f"{name}: CPR {float(curve.cpr[a]):.3g}, CMD {float(curve.cmd[a]):.3g}", customdata=edges.tolist(),
            hovertemplate="%{customdata} edges (%{x:.3%})<br>faithfulness %{y:.3f}<extra></extra>",
        ))
        if curve.random_faithfulness.shape[1]:
            random_x = (curve.random_n_edges.float().mean(0).cpu() / curve.n_items)[order]
            fig.add_trace(go.Scatter(
                x=random_x.tolist(), y=curve.random_faithfulness[a].mean(0).cpu()[order].tolist(), mode="lines",
                line={"color": colour, "dash": "dash"}, name=f"{name}: random edges",
                hovertemplate="%{x:.3%} of edges<br>faithfulness %{y:.3f}<extra></extra>",
            ))
    positive = x[x > 0]
    fig.update_layout(
        title=title, template="plotly_white", xaxis_title="fraction of edges in the circuit",
        yaxis_title="normalised faithfulness", xaxis={"type": "log" if log_x and len(positive) else "linear", "tickformat": ".1%"},
    )
    return fig


def _node_positions(cfg: Any) -> Dict[str, Tuple[float, float]]:
    """Node name -> (x, y): the embedding at the bottom, each block's heads then its MLP a row up, the logits on top."""
    n_layers, n_heads = int(cfg.n_layers), int(cfg.n_heads)
    width = n_heads + 1
    pos = {"embed": (width / 2 - 0.5, 0.0)}
    for l in range(n_layers):
        for h in range(n_heads):
            pos[f"L{l}H{h}"] = (float(h), 2.0 * l + 1)
        pos[f"MLP{l}"] = (width / 2 - 0.5, 2.0 * l + 2)
    pos["logits"] = (width / 2 - 0.5, 2.0 * n_layers + 1)
    return pos


def circuit_graph_figure(
    model_or_cfg: Any,
    circuit: Bool[Tensor, "writer reader"],
    scores: Optional[Float[Tensor, "writer reader"]] = None,
    effects: Optional[Float[Tensor, "writer reader"]] = None,
    title: str = "Circuit",
):
    """The circuit's edges between nodes placed by layer: colour by ``scores`` (diverging, 0 white-ish),
    width by ``|effects|`` (e.g. exact edge effects; default ``|scores|``). Nodes without a circuit edge are grey."""
    go = _plotly()
    cfg = getattr(model_or_cfg, "cfg", model_or_cfg)
    layout = edge_layout(cfg)
    shape = (len(layout.writers), len(layout.readers))
    if not isinstance(circuit, Tensor) or circuit.dtype != torch.bool or tuple(circuit.shape) != shape:
        raise ValueError(f"circuit must be a boolean [n_writers, n_readers] = {list(shape)} mask")
    scores = getattr(scores, "scores", scores)
    for what, t in (("scores", scores), ("effects", effects)):
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(f"{what} must have shape {list(shape)}, got {tuple(t.shape)}")
    # the node(s) each reader feeds (a K/V head: its whole group), named as their writers; the logits are no node
    reader_of, writer_of, is_logits, _ = _node_maps(layout, int(cfg.n_heads), torch.device("cpu"))
    node_names = [layout.writer_names[w] for w in writer_of.argmax(0).tolist()]
    targets = [["logits"] if is_logits[r] else [node_names[n] for n in torch.nonzero(reader_of[r]).flatten().tolist()]
               for r in range(shape[1])]
    pos = _node_positions(cfg)
    edges = torch.nonzero(circuit.cpu()).tolist()
    colour_of = scores.detach().float().cpu() if scores is not None else torch.ones(shape)
    width_of = (effects if effects is not None else colour_of).detach().float().cpu().abs()
    bound = float(colour_of[circuit.cpu()].abs().max()) if edges else 1.0
    top = float(width_of[circuit.cpu()].max()) if edges else 1.0
    fig = go.Figure()
    used = set()
    for w, r in edges:
        source = layout.writer_names[w]
        for target in targets[r]:
            used.update((source, target))
            (x0, y0), (x1, y1) = pos[source], pos[target]
            value = float(colour_of[w, r])
            shade = _diverging(value / (bound or 1.0))
            fig.add_trace(go.Scatter(
                x=[x0, x1], y=[y0, y1], mode="lines", showlegend=False, hoverinfo="text",
                line={"color": shade, "width": 1 + 5 * float(width_of[w, r]) / (top or 1.0)},
                text=f"{source} -> {layout.reader_names[r]}<br>score {value:.4g}",
            ))
    names = list(pos)
    fig.add_trace(go.Scatter(
        x=[pos[n][0] for n in names], y=[pos[n][1] for n in names], mode="markers+text", text=names,
        textposition="top center", showlegend=False, hoverinfo="text",
        marker={"size": 12, "color": ["#333" if n in used else "#ccc" for n in names]},
    ))
    fig.update_layout(
        title=title, template="plotly_white", xaxis={"visible": False},
        yaxis={"title": "layer (heads, then MLP)", "tickvals": [2 * l + 1 for l in range(int(cfg.n_layers))],
               "ticktext": [str(l) for l in range(int(cfg.n_layers))]},
    )
    return fig


def _diverging(t: float) -> str:
    """``t`` in [-1, 1] -> a colour from blue (-1) through light grey (0) to red (+1)."""
    t = max(-1.0, min(1.0, t))
    grey = (200, 200, 200)
    end = (178, 24, 43) if t >= 0 else (33, 102, 172)
    rgb = [round(g + abs(t) * (e - g)) for g, e in zip(grey, end)]
    return f"rgb({rgb[0]},{rgb[1]},{rgb[2]})"
