"""Row statistics of a norm's input, accumulated tile by tile over ``d_model`` inside a kernel.

Shared by the kernels that apply or linearise LayerNorm / RMSNorm without holding a whole row.
"""

import triton
import triton.language as tl


@triton.jit
def merge_row_moments(x, mask_cols, n_cols, count, mean, m2, IS_RMS: tl.constexpr):
    """Fold one ``[rows, cols]`` tile ``x`` (0 outside ``mask_cols``; ``n_cols`` valid columns) into
    the running ``(count, mean [rows], m2 [rows])``. RMS: ``m2`` is the sum of squares. LN: ``m2`` is
    the centred sum of squares, merged with Chan et al.'s pairwise update (stable in fp32)."""
    if IS_RMS:
        m2 += tl.sum(x * x, axis=1)
    else:
        mean_k = tl.sum(x, axis=1) / n_cols
        c = tl.where(mask_cols[None, :], x - mean_k[:, None], 0.0)
        m2_k = tl.sum(c * c, axis=1)
        total = count + n_cols
        diff = mean_k - mean
        mean += diff * (n_cols / total)
        m2 += m2_k + diff * diff * (count * n_cols / total)
        count = total
    return count, mean, m2
