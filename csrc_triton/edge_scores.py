"""Fused Q/K/V edge-score contraction for edge attribution (docs/architecture.md, section 5).

For writers ``delta[s]`` (residual writes, clean minus corrupted, ``[M, D]`` with ``M = batch *
pos``) and readers ``r`` of layer ``l`` (one head's Q, K or V projection ``W[l, r]`` ``[D, E]``
with hook gradient ``g[l, r]`` ``[M, E]``), compute::

    out[s, l, r] = sum_m delta[s, m] . J_l(x[l, m])^T (gamma_l * (g[l, r, m] @ W[l, r]^T))

with ``J_l`` the Jacobian of layer ``l``'s ``ln1`` (LN or RMS, scale ``gamma_l``, epsilon ``eps``)
at the residual ``x[l]``. With ``sigma``/``xhat`` the row's scale and normalised input (LN:
centred) and ``U~ = gamma * (g @ W^T) / sigma``, the norm's VJP splits into (see
``fastpatch.ops.edge_scores``)::

    out[s, l, r] = sum_m [ delta[s, m] . U~[r, m]
                           - sum_d(delta[s, m]) * mean_d(U~[r, m])          (LN only)
                           - (delta[s, m] . xhat[m]) * mean_d(xhat[m] * U~[r, m]) ]

so the ``[rows, readers, d_model]`` reader gradients are never formed: per ``(row tile, d tile)``
the program builds ``U~`` as a ``[BLOCK_R, BLOCK_M, BLOCK_D]`` register tile (a batched
``tl.dot`` of ``g`` and ``W^T`` over ``d_head``), multiplies it into the ``[BLOCK_S, BLOCK_R]``
accumulator with one ``tl.dot`` whose reduction axis is the flattened ``(row, d)`` tile, and keeps
the per-row sums the two corrections need (``[BLOCK_S, BLOCK_M]`` and ``[BLOCK_R, BLOCK_M]``),
applied with two small ``tl.dot`` per row tile once the tile's ``d`` loop is done.

Shapes: ``delta [S, M, D]``, ``g [L, R, M, E]``, ``W [L, R, D, E]``, ``x [L, M, D]``,
``gamma [L, D]``, ``out [S, L, R]`` (fp32).

Grid ``(L * cdiv(R, BLOCK_R), cdiv(S, BLOCK_S))``: axis 0 (launched fastest) walks the readers,
so programs running together share the same writer tile (the largest operand) in L2. Each
program loops over all row tiles; per row tile it

1. loads ``x[l]`` tile by tile over ``D`` and merges the row statistics in fp32 (LN: Chan's
   parallel mean / centred sum of squares; RMS: sum of squares);
2. loops over ``D`` tiles: ``U~`` (fp32 accumulation over ``E`` tiles), its two row means, the
   writers' tile ``[BLOCK_S, BLOCK_M, BLOCK_D]`` and its two row sums, and the main ``tl.dot``.

Memory traffic per program: ``BLOCK_S * M * D`` of delta, ``BLOCK_R * M * E`` of g,
``cdiv(M, BLOCK_M) * BLOCK_R * D * E`` of W, ``2 * M * D`` of x, and ``BLOCK_S * BLOCK_R``
written. Over the grid delta is read ``L * cdiv(R, BLOCK_R)`` times (L2 hits for programs in
flight together), g and W ``cdiv(S, BLOCK_S)`` times. FLOPs: ``2 * S * L * R * M * D`` for the
main contraction plus ``2 * cdiv(S, BLOCK_S) * L * R * M * D * E`` to rebuild ``U~``; the unfused
version writes and reads the ``L * R * M * D`` reader gradients instead.

Precision: fp32 inputs multiply in IEEE fp32 (TF32 with ``allow_tf32``); bf16/fp16 inputs
multiply in their dtype (``U~`` is rounded to the writers' dtype for the main dot) with fp32
accumulation; the row statistics and both corrections are fp32 throughout.

The launcher does no dispatch and no autograd; see ``fastpatch.ops.edge_scores``.
Run on CPU tensors with ``TRITON_INTERPRET=1`` set before this module is imported.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import triton
import triton.language as tl
from jaxtyping import Float
from torch import Tensor

from csrc_triton.launch import MAX_GRID_YZ, Launch, check_power_of_two, output_buffer, target_arch
from csrc_triton.row_moments import merge_row_moments


@triton.jit
def _qkv_edge_scores_kernel(
    d_ptr,  # [S, M, D] writers
    g_ptr,  # [L, R, M, E]
    W_ptr,  # [L, R, D, E]
    x_ptr,  # [L, M, D]
    w_ptr,  # [L, D]
    out_ptr,  # [S, L, R] fp32
    S,
    M,
    D,
    E,
    R,
    n_rblocks,
    eps,
    stride_ds,
    stride_dm,
    stride_dd,
    stride_gl,
    stride_gr,
    stride_gm,
    stride_ge,
    stride_Wl,
    stride_Wr,
    stride_Wd,
    stride_We,
    stride_xl,
    stride_xm,
    stride_xd,
    stride_wl,
    stride_wd,
    stride_os,
    stride_ol,
    stride_or,
    IS_RMS: tl.constexpr,
    USE_DOT: tl.constexpr,
    PRECISION_U: tl.constexpr,
    PRECISION_MAIN: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    pid_lr = tl.program_id(0)
    pid_s = tl.program_id(1)
    l = (pid_lr // n_rblocks).to(tl.int64)
    rb = pid_lr % n_rblocks

    offs_s = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    offs_r = rb * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_s = offs_s < S
    mask_r = offs_r < R
    ar_m = tl.arange(0, BLOCK_M)
    ar_d = tl.arange(0, BLOCK_D)
    ar_e = tl.arange(0, BLOCK_E)

    d_base = d_ptr + offs_s[:, None, None].to(tl.int64) * stride_ds
    g_base = g_ptr + l * stride_gl + offs_r[:, None, None].to(tl.int64) * stride_gr
    W_base = W_ptr + l * stride_Wl + offs_r[:, None, None].to(tl.int64) * stride_Wr
    x_base = x_ptr + l * stride_xl
    w_base = w_ptr + l * stride_wl

    acc = tl.zeros([BLOCK_S, BLOCK_R], dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        offs_m = m0 + ar_m
        mask_m = offs_m < M
        xm_base = x_base + offs_m[:, None].to(tl.int64) * stride_xm

        # ---- pass 1: the rows' norm statistics (fp32) ------------------------------------------
        count = tl.zeros([], dtype=tl.float32)
        mean = tl.zeros([BLOCK_M], dtype=tl.float32)
        m2 = tl.zeros([BLOCK_M], dtype=tl.float32)  # LN: centred sum of squares; RMS: sum of squares
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + ar_d
            mask_d = offs_d < D
            x = tl.load(xm_base + offs_d[None, :] * stride_xd, mask=mask_m[:, None] & mask_d[None, :], other=0.0)
            x = x.to(tl.float32)
            count, mean, m2 = merge_row_moments(x, mask_d, tl.minimum(D - d0, BLOCK_D).to(tl.float32), count, mean, m2, IS_RMS)
        rstd = tl.rsqrt(m2 / D + eps)

        # ---- pass 2: U~ tile by tile, the main contraction and the correction sums -------------
        s_sum = tl.zeros([BLOCK_S, BLOCK_M], dtype=tl.float32)  # sum_d delta            (LN)
        s_xhat = tl.zeros([BLOCK_S, BLOCK_M], dtype=tl.float32)  # sum_d delta * xhat
        u_mean = tl.zeros([BLOCK_R, BLOCK_M], dtype=tl.float32)  # sum_d U~              (LN)
        u_xhat = tl.zeros([BLOCK_R, BLOCK_M], dtype=tl.float32)  # sum_d xhat * U~
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + ar_d
            mask_d = offs_d < D
            mask_md = mask_m[:, None] & mask_d[None, :]
            x = tl.load(xm_base + offs_d[None, :] * stride_xd, mask=mask_md, other=0.0).to(tl.float32)
            if IS_RMS:
                xhat = x * rstd[:, None]
            else:
                xhat = (x - mean[:, None]) * rstd[:, None]
            xhat = tl.where(mask_md, xhat, 0.0)  # padded columns would otherwise hold -mean * rstd
            gamma = tl.load(w_base + offs_d * stride_wd, mask=mask_d, other=0.0).to(tl.float32)

            # U~[r, m, d] = gamma[d] * rstd[m] * sum_e g[r, m, e] W[r, d, e]
            u = tl.zeros([BLOCK_R, BLOCK_M, BLOCK_D], dtype=tl.float32)
            for e0 in range(0, E, BLOCK_E):
                offs_e = e0 + ar_e
                mask_e = offs_e < E
                g = tl.load(
                    g_base + offs_m[None, :, None].to(tl.int64) * stride_gm + offs_e[None, None, :] * stride_ge,
                    mask=mask_r[:, None, None] & mask_m[None, :, None] & mask_e[None, None, :],
                    other=0.0,
                )  # [R, M, E]
                Wt = tl.load(
                    W_base + offs_e[None, :, None] * stride_We + offs_d[None, None, :] * stride_Wd,
                    mask=mask_r[:, None, None] & mask_e[None, :, None] & mask_d[None, None, :],
                    other=0.0,
                )  # [R, E, D]
                if USE_DOT:
                    u = tl.dot(g, Wt.to(g.dtype), u, input_precision=PRECISION_U, out_dtype=tl.float32)
                else:
                    u += tl.sum(g.to(tl.float32)[:, :, :, None] * Wt.to(tl.float32)[:, None, :, :], axis=2)
            u = u * gamma[None, None, :] * rstd[None, :, None]
            u_xhat += tl.sum(u * xhat[None, :, :], axis=2)
            if not IS_RMS:
                u_mean += tl.sum(u, axis=2)

            delta = tl.load(
                d_base + offs_m[None, :, None].to(tl.int64) * stride_dm + offs_d[None, None, :] * stride_dd,
                mask=mask_s[:, None, None] & mask_md[None, :, :],
                other=0.0,
            )  # [S, M, D]
            delta32 = delta.to(tl.float32)
            s_xhat += tl.sum(delta32 * xhat[None, :, :], axis=2)
            if not IS_RMS:
                s_sum += tl.sum(delta32, axis=2)
            # the main contraction: reduce over the flattened (row, d) tile
            d2 = tl.reshape(delta, (BLOCK_S, BLOCK_M * BLOCK_D))
            u2 = tl.reshape(u, (BLOCK_R, BLOCK_M * BLOCK_D))
            if USE_DOT:
                acc = tl.dot(d2, tl.trans(u2.to(delta.dtype)), acc, input_precision=PRECISION_MAIN, out_dtype=tl.float32)
            else:
                acc += tl.sum(d2.to(tl.float32)[:, None, :] * u2[None, :, :], axis=2)

        # ---- the norm's rank-one corrections for this row tile (fp32) --------------------------
        u_xhat = u_xhat / D
        if USE_DOT:
            acc -= tl.dot(s_xhat, tl.trans(u_xhat), input_precision="ieee", out_dtype=tl.float32)
        else:
            acc -= tl.sum(s_xhat[:, None, :] * u_xhat[None, :, :], axis=2)
        if not IS_RMS:
            u_mean = u_mean / D
            if USE_DOT:
                acc -= tl.dot(s_sum, tl.trans(u_mean), input_precision="ieee", out_dtype=tl.float32)
            else:
                acc -= tl.sum(s_sum[:, None, :] * u_mean[None, :, :], axis=2)

    o_ptrs = out_ptr + offs_s[:, None].to(tl.int64) * stride_os + l * stride_ol + offs_r[None, :] * stride_or
    tl.store(o_ptrs, acc, mask=mask_s[:, None] & mask_r[None, :])


def plan_qkv_edge_scores(
    writers: Float[Tensor, "writer row d_model"],
    grads: Float[Tensor, "layer reader row d_head"],
    W: Float[Tensor, "layer reader d_model d_head"],
    x: Float[Tensor, "layer row d_model"],
    norm_w: Float[Tensor, "layer d_model"],
    out: Float[Tensor, "writer layer reader"],
    *,
    norm: str,
    eps: float,
    block_s: Optional[int] = None,
    block_r: Optional[int] = None,
    block_m: Optional[int] = None,
    block_d: Optional[int] = None,
    block_e: Optional[int] = None,
    allow_tf32: bool = False,
    num_warps: Optional[int] = None,
    num_stages: Optional[int] = None,
    arch: Optional[int] = None,
) -> Launch:
    """The launch ``qkv_edge_scores_triton`` makes for these tensors (see ``csrc_triton.launch``).

    Works on ``meta`` tensors: ``bench/kernel_resources.py`` plans with them, passing ``arch``.
    """
    S, M, D = writers.shape
    L, R, _, E = grads.shape
    arch = target_arch(writers, arch)
    config = _default_config(D, E, writers.dtype, grads.dtype, arch)
    BLOCK_S = block_s or config["BLOCK_S"]
    BLOCK_R = block_r or config["BLOCK_R"]
    BLOCK_M = block_m or config["BLOCK_M"]
    BLOCK_D = block_d or config["BLOCK_D"]
    BLOCK_E = block_e or config["BLOCK_E"]
    check_power_of_two(block_s=BLOCK_S, block_r=BLOCK_R, block_m=BLOCK_M, block_d=BLOCK_D, block_e=BLOCK_E)
    use_dot = min(BLOCK_S, BLOCK_R, BLOCK_M, BLOCK_D, BLOCK_E) >= 16
    n_rblocks = triton.cdiv(R, BLOCK_R)
    grid = (L * n_rblocks, triton.cdiv(S, BLOCK_S))
    if grid[1] > MAX_GRID_YZ:
        raise ValueError(f"grid {grid} exceeds the launch limit; use a larger block_s")
    half_d = writers.dtype in (torch.float16, torch.bfloat16)
    half_g = grads.dtype in (torch.float16, torch.bfloat16)
    args = (
        writers, grads, W, x, norm_w, out,
        S, M, D, E, R, n_rblocks, float(eps),
        writers.stride(0), writers.stride(1), writers.stride(2),
        grads.stride(0), grads.stride(1), grads.stride(2), grads.stride(3),
        W.stride(0), W.stride(1), W.stride(2), W.stride(3),
        x.stride(0), x.stride(1), x.stride(2),
        norm_w.stride(0), norm_w.stride(1),
        out.stride(0), out.stride(1), out.stride(2),
    )
    constexprs = dict(
        IS_RMS=norm == "RMS",
        USE_DOT=use_dot,
        PRECISION_U="tf32" if (allow_tf32 or half_g) else "ieee",
        PRECISION_MAIN="tf32" if (allow_tf32 or half_d) else "ieee",
        BLOCK_S=BLOCK_S,
        BLOCK_R=BLOCK_R,
        BLOCK_M=BLOCK_M,
        BLOCK_D=BLOCK_D,
        BLOCK_E=BLOCK_E,
    )
    return Launch(
        _qkv_edge_scores_kernel, grid, args, constexprs,
        num_warps=num_warps or (config["num_warps"] if use_dot else 4),
        num_stages=num_stages or config["num_stages"],
        arch=arch,
        notes=dict(S=S, L=L, R=R, M=M, D=D, E=E, norm=norm),
    )


def qkv_edge_scores_triton(
    writers: Float[Tensor, "writer row d_model"],
    grads: Float[Tensor, "layer reader row d_head"],
    W: Float[Tensor, "layer reader d_model d_head"],
    x: Float[Tensor, "layer row d_model"],
    norm_w: Float[Tensor, "layer d_model"],
    *,
    norm: str,
    eps: float,
    out: Optional[Float[Tensor, "writer layer reader"]] = None,
    **config: Any,
) -> Float[Tensor, "writer layer reader"]:
    """Launch ``_qkv_edge_scores_kernel``; arguments as ``fastpatch.ops.qkv_edge_scores_reference``.

    Shapes are assumed valid (the public function validates them). ``out`` (contiguous fp32
    ``[writer, layer, reader]``) is written in place when given. ``config`` overrides the plan's
    choices (:func:`plan_qkv_edge_scores`: ``block_s``, ``block_r``, ``block_m``, ``block_d``,
    ``block_e``, ``allow_tf32``, ``num_warps``, ``num_stages``). Block sizes must be powers of
    two; blocks below 16 fall back from ``tl.dot`` to multiply-sums (used by the interpreter tests
    to get several tiles on tiny shapes).
    """
    S, M, D = writers.shape
    L, R, _, E = grads.shape
    out = output_buffer(out, (S, L, R), torch.float32, writers.device)
    if out.numel() == 0:
        return out
    if M == 0 or D == 0 or E == 0:
        return out.zero_()
    plan_qkv_edge_scores(writers, grads, W, x, norm_w, out, norm=norm, eps=eps, **config)()
    return out


def _default_config(D: int, E: int, writer_dtype: torch.dtype, grad_dtype: torch.dtype, arch: int) -> dict:
    """Blocks, warps and stages per dtype and architecture (measured: docs/design-notes.md).

    The two 3-D register tiles (``U~`` ``[BLOCK_R, BLOCK_M, BLOCK_D]`` and the writers'
    ``[BLOCK_S, BLOCK_M, BLOCK_D]``) and their transposition into the main dot's operands decide
    registers and shared memory. Compiled for sm_80 and sm_90 (``bench/kernel_resources.py``),
    16 on every block axis with 8 warps and no software pipelining is the largest tiling that
    spills nothing in fp32, bf16 and fp16; 4 warps, a ``d_model`` tile of 32, or 2 pipeline
    stages each spill, and the old default (``BLOCK_D`` 32, ``BLOCK_E`` 64, 3 stages) asked for
    384 KB of shared memory in fp32. On sm_100 ptxas caps that fp32 variant at 128 registers and
    spills; a ``d_head`` tile of 32 compiles there in 180 registers without a spill.
    ``U~`` is rebuilt ``cdiv(S, BLOCK_S)`` times (see :func:`qkv_edge_scores_cost`): half
    precision takes ``BLOCK_S = 32``, halving that work at 230-238 registers on sm_80/sm_90
    (64 spills on sm_90); fp32 stays at 16.
    """
    fp32 = writer_dtype == torch.float32
    block_e = 32 if (arch >= 100 and fp32) else 16
    block_s = 16 if fp32 else 32
    return dict(BLOCK_S=block_s, BLOCK_R=16, BLOCK_M=16, BLOCK_D=16, BLOCK_E=block_e, num_warps=8, num_stages=1)


def qkv_edge_scores_cost(launch: Launch) -> dict:
    """FLOPs and DRAM bytes of one launch (the static roofline of ``bench/kernel_resources.py``).

    With ``T_s = cdiv(S, BLOCK_S)`` writer blocks and element sizes ``e_*``::

        flops = 2 * S * L * R * M * D              (the main contraction)
              + 2 * T_s * L * R * M * D * E        (U~ rebuilt once per writer block)
              + 6 * T_s * L * R * M * D            (scaling U~ and its two row sums)
        bytes = e_d * S * M * D                    (writers: programs in flight share a writer tile)
              + T_s * (e_g * L * R * M * E + e_W * L * R * D * E + e_x * L * M * D)
              + 4 * S * L * R                      (the scores, fp32)
    """
    n = launch.notes
    S, L, R, M, D, E = n["S"], n["L"], n["R"], n["M"], n["D"], n["E"]
    writers, grads, W, x = launch.args[:4]
    tiles_s = -(-S // launch.constexprs["BLOCK_S"])
    flops = 2 * S * L * R * M * D + 2 * tiles_s * L * R * M * D * E + 6 * tiles_s * L * R * M * D
    moved = (writers.element_size() * S * M * D
             + tiles_s * (grads.element_size() * L * R * M * E + W.element_size() * L * R * D * E + x.element_size() * L * M * D)
             + 4 * S * L * R)
    return {"flops": float(flops), "bytes": float(moved)}
