"""Batched patch setters: many cells patched into one activation with one masked write.

In a batched forward the activation has ``n_cells * batch`` rows; viewed as
``[n_cells, batch, ...]``, row block ``c`` belongs to cell ``c``. TransformerLens's setters
patch one index into a ``[batch, ...]`` activation; their batched twins here patch ``k`` cells
at once by advanced indexing. A setter with no twin (a caller's own) is called once per cell on
that cell's row block, exactly as TransformerLens would call it on the whole batch.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
from transformer_lens import patching as tl_patching

# For each TransformerLens setter: which activation axes (after batch) the index columns after
# ``layer`` address, in order. E.g. layer_head_vector_patch_setter's index is (layer, head) and
# head is axis 2 of a [batch, pos, head, d_head] activation.
_SETTER_AXES: Dict[Callable, Tuple[int, ...]] = {
    tl_patching.layer_pos_patch_setter: (1,),
    tl_patching.layer_pos_head_vector_patch_setter: (1, 2),
    tl_patching.layer_head_vector_patch_setter: (2,),
    tl_patching.layer_head_pattern_patch_setter: (1,),
    tl_patching.layer_head_pos_pattern_patch_setter: (1, 2),
    tl_patching.layer_head_dest_src_pos_pattern_patch_setter: (1, 2, 3),
}


def setter_axes(patch_setter: Callable) -> Optional[Tuple[int, ...]]:
    """The activation axes a known setter writes, or ``None`` for a caller's own setter."""
    return _SETTER_AXES.get(patch_setter)


def apply_batched(
    activation: torch.Tensor,
    axes: Tuple[int, ...],
    cell_rows: torch.Tensor,
    indices: torch.Tensor,
    clean: torch.Tensor,
) -> None:
    """Patch ``k`` cells in place.

    Args:
        activation: ``[n_cells, batch, ...]`` view of the batched activation.
        axes: activation axes (counting batch as 0) addressed by ``indices``' columns.
        cell_rows: ``[k]`` which row block each cell owns.
        indices: ``[k, len(axes)]`` the index of each cell (without its layer).
        clean: ``[batch or 1, ...]`` the clean activation of this layer.
    """
    columns = [indices[:, i] for i in range(len(axes))]
    target = [cell_rows, slice(None)] + [slice(None)] * (activation.ndim - 2)
    source = [slice(None)] * clean.ndim
    for axis, column in zip(axes, columns):
        target[axis + 1] = column
        source[axis] = column
    # The indexed axes are contiguous, so their [k] axis lands where the first one was.
    values = clean[tuple(source)].movedim(axes[0], 0)
    activation[tuple(target)] = values.to(activation.dtype)


def apply_per_cell(
    activation: torch.Tensor,
    patch_setter: Callable,
    cells: Sequence[Tuple[int, list]],
    clean: torch.Tensor,
) -> None:
    """Call a caller's setter once per cell on that cell's ``[batch, ...]`` row block."""
    for row, index in cells:
        block = activation[row]
        patched = patch_setter(block, index, clean)
        if patched is not block:
            activation[row] = patched
