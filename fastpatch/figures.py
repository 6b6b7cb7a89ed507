"""Plotly figures of sweep results, and a one-call self-contained HTML report.

Heatmaps use a diverging colour scale centred on 0 when values have both signs (effects), a
sequential one otherwise; layer on the y axis from the bottom up, token strings on position axes.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from fastpatch.analysis import Values, _tensor


def _plotly():
    try:
        import plotly.graph_objects as go
    except ImportError as error:  # pragma: no cover - plotly is a dependency
        raise ImportError("figures need plotly: pip install plotly") from error
    return go


def heatmap(values: Values, *, x_label: str, y_label: str = "layer", x_ticks: Optional[Sequence[str]] = None,
            y_ticks: Optional[Sequence[str]] = None, title: str = "", colorbar: str = "effect"):
    """A ``[rows, cols]`` heatmap (rows bottom-up), colour centred on 0."""
    go = _plotly()
    z = _tensor(values).detach().float().cpu()
    if z.ndim != 2:
        raise ValueError(f"a heatmap needs a 2-D result, got shape {tuple(z.shape)}")
    low, high = float(z.min()), float(z.max())
    diverging = low < 0 < high  # signed effects: white at 0; otherwise a sequential scale
    bound = max(abs(low), abs(high)) or 1.0
    colours = dict(colorscale="RdBu", zmid=0, zmin=-bound, zmax=bound) if diverging else dict(colorscale="Viridis")
    x = list(x_ticks) if x_ticks is not None else list(range(z.shape[1]))
    if len(x) != z.shape[1]:
        raise ValueError(f"{len(x)} x labels for {z.shape[1]} columns")
    x = [f"{i}: {t}" for i, t in enumerate(x)] if x_ticks is not None else x
    y = list(y_ticks) if y_ticks is not None else list(range(z.shape[0]))
    fig = go.Figure(go.Heatmap(z=z.tolist(), x=x, y=y, **colours,
                               colorbar={"title": colorbar},
                               hovertemplate=f"{y_label} %{{y}}<br>{x_label} %{{x}}<br>{colorbar} %{{z:.4g}}<extra></extra>"))
    fig.update_layout(title=title, xaxis_title=x_label, yaxis_title=y_label, template="plotly_white",
                      xaxis={"type": "category"}, yaxis={"type": "category"})
    return fig


def layer_head_heatmap(values: Values, title: str = "Head patching effect"):
    """``[n_layers, n_heads]`` (e.g. ``get_act_patch_attn_head_out_all_pos``)."""
    return heatmap(values, x_label="head", title=title)


def layer_position_heatmap(values: Values, tokens: Optional[Sequence[str]] = None, title: str = "Patching effect by position"):
    """``[n_layers, pos]`` (e.g. ``get_act_patch_resid_pre``) with token labels on the x axis."""
    return heatmap(values, x_label="position", x_ticks=tokens, title=title)


def direct_path_matrix(values: Tensor, title: str = "Direct path effects (source head -> destination head)"):
    """``[n_layers, n_heads, n_layers, n_heads]`` from ``get_act_patch_direct_path_all_sources`` as a
    sources x destinations matrix, labelled ``L<l>H<h>``."""
    v = _tensor(values)
    if v.ndim != 4:
        raise ValueError(f"expected [n_layers, n_heads, n_layers, n_heads], got {tuple(v.shape)}")
    L, H = v.shape[:2]
    names = [f"L{l}H{h}" for l in range(L) for h in range(H)]
    return heatmap(v.reshape(L * H, L * H), x_label="destination", y_label="source", x_ticks=None,
                   y_ticks=names, title=title).update_xaxes(ticktext=names, tickvals=list(range(L * H)))


def attribution_scatter(exact: Values, estimate: Values, labels: Optional[Sequence[str]] = None,
                        title: str = "Attribution estimate vs exact patching"):
    """One point per cell: exact effect (x) against its attribution estimate (y), with the diagonal."""
    go = _plotly()
    x = _tensor(exact).detach().float().reshape(-1).cpu()
    y = _tensor(estimate).detach().float().reshape(-1).cpu()
    if x.shape != y.shape:
        raise ValueError(f"exact has {x.numel()} cells, estimate {y.numel()}")
    lo, hi = float(torch.minimum(x.min(), y.min())), float(torch.maximum(x.max(), y.max()))
    fig = go.Figure([
        go.Scatter(x=x.tolist(), y=y.tolist(), mode="markers", text=list(labels) if labels else None, name="cells"),
        go.Scatter(x=[lo, hi], y=[lo, hi], mode="lines", line={"dash": "dot", "color": "grey"}, name="y = x"),
    ])
    fig.update_layout(title=title, xaxis_title="exact patching effect", yaxis_title="attribution estimate", template="plotly_white")
    return fig


def write_report(path: Union[str, Path], sections: Sequence[tuple], title: str = "fastpatch report",
                 png_dir: Optional[Union[str, Path]] = None) -> Path:
    """Write one self-contained HTML file (plotly.js inlined once) with ``sections``.

    Each section is ``(heading, content)`` where content is a plotly figure, a pandas DataFrame or
    a string (shown as preformatted text). With ``png_dir`` each figure is also saved as a PNG when
    kaleido is installed (skipped silently otherwise: the HTML is the report).
    """
    path = Path(path)
    parts, first_figure = [], True
    for i, (heading, content) in enumerate(sections):
        parts.append(f"<h2>{html.escape(heading)}</h2>")
        if hasattr(content, "to_html") and hasattr(content, "layout"):  # a plotly figure
            parts.append(content.to_html(full_html=False, include_plotlyjs="inline" if first_figure else False))
            first_figure = False
            if png_dir is not None:
                try:
                    Path(png_dir).mkdir(parents=True, exist_ok=True)
                    content.write_image(str(Path(png_dir) / f"figure_{i}.png"))
                except (ValueError, ImportError, RuntimeError):
                    pass
        elif hasattr(content, "to_html"):  # a DataFrame
            parts.append(content.to_html(index=False, float_format=lambda v: f"{v:.4g}", classes="table"))
        else:
            parts.append(f"<pre>{html.escape(str(content))}</pre>")
    page = f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}
pre{{background:#f6f6f6;padding:1em;overflow-x:auto}}</style></head>
<body><h1>{html.escape(title)}</h1>
{''.join(parts)}
</body></html>
"""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path
