"""Fused delta projection for direct path patching (docs/architecture.md, section 5).

For a batch of source residual writes ``delta[s]`` (clean minus corrupted) compute their effect
on the Q/K/V input of every destination head of every destination layer ``l`` in one launch::

    exact,  LN : out[s, l] = LN_l(resid[l] + delta[s]) @ W[l]
                 LN_l(x)   = (x - mean(x)) * rsqrt(mean((x - mean(x))^2) + eps) * w_l + b_l
    exact,  RMS: out[s, l] = ((resid[l] + delta[s]) * rsqrt(mean((resid[l] + delta[s])^2) + eps) * w_l) @ W[l]
    linear, LN : out[s, l] = ((delta[s] - mean(delta[s])) * rsqrt(var(resid[l]) + eps) * w_l) @ W[l]
    linear, RMS: out[s, l] = (delta[s] * rsqrt(mean(resid[l]^2) + eps) * w_l) @ W[l]

with means and variances over ``d_model`` per (batch, pos) row; ``linear`` is the change of the
projected normalised input to first order in ``delta`` with the scale frozen at the corrupted
residual's (the projection bias is the caller's: exact adds it, linear is a change).

Shapes: ``delta [S, M, D]``, ``resid [L, M, D]`` (``M = batch * pos``), ``w, b [L, D]``,
``W [L, D, N]`` (``N = n_heads * d_head``, or Q|K|V concatenated), ``out [S, L, M, N]``.

Why fused: the patched, normalised input ``norm(resid[l] + delta[s])`` is an ``[S, L, M, D]``
tensor. Unfused, ``resid + delta`` and its normalisation are each written and read once: about
``4 * S * L * M * D`` elements of extra traffic through a buffer ``S`` times the size of the
corrupted residual cache (GPT-2 small, 144 source heads x 12 layers x d_model 768: 1.3M floats
per (batch, pos) row). The output write, ``S * L * M * N`` elements, is irreducible; with Q|K|V
concatenated (``N = 3 * D``) the unfused version moves ~2.3x the bytes. Here the normalised
input only ever exists as a ``[BLOCK_M, BLOCK_K]`` tile in registers.

Grid ``(S * L, cdiv(M, BLOCK_M), cdiv(N, BLOCK_N))``, axis 0 ordered ``pid0 = l * S + s`` so that programs launched together share ``resid[l]``'s row
tile and ``W[l]``'s column tile in L2. Each program

1. loads ``[BLOCK_M, BLOCK_K]`` tiles of ``resid[l]`` and ``delta[s]`` for ``k = 0, BLOCK_K, ...``
   and accumulates the row statistics in fp32 (LN: mean and centred sum of squares, combined
   tile by tile with Chan's parallel formula, so there is no ``E[x^2] - E[x]^2`` cancellation;
   RMS: sum of squares; linear LN additionally the mean of ``delta``);
2. loops over the ``d_model`` tiles again, normalises the tile in registers (fp32), casts it to
   ``W``'s dtype and accumulates ``tile @ W[l][k tile, n tile]`` into an fp32
   ``[BLOCK_M, BLOCK_N]`` accumulator (``tl.dot`` when every block is >= 16, a broadcast
   multiply-sum otherwise), and stores it once, in the output dtype.

Memory traffic. Per program: ``BLOCK_M * D`` elements of resid and of delta in each of the two
passes (linear RMS skips delta in the first), ``D * BLOCK_N`` of W, ``2 * D`` of w and b, and
``BLOCK_M * BLOCK_N`` written. Over the grid the loads repeat (resid/delta tiles once per n tile
and source or layer, W tiles once per source and row tile) but are L2 hits after the first, so
DRAM sees about ``(S + L) * M * D + L * (D * N + 2 * D)`` elements read and ``S * L * M * N``
written: the output is the dominant, irreducible term. FLOPs: ``2 * S * L * M * D * N`` in the
dot plus ``O(S * L * M * D * cdiv(N, BLOCK_N))`` for the recomputed statistics and normalisation.

The launcher does no dispatch and no autograd; see ``fastpatch.ops.delta_projection``.
Run on CPU tensors with ``TRITON_INTERPRET=1`` set before this module is imported.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import triton
import triton.language as tl
from jaxtyping import Float
from torch import Tensor

from csrc_triton.launch import MAX_GRID_YZ, Launch, check_power_of_two, output_buffer, pick_block, target_arch
from csrc_triton.row_moments import merge_row_moments


@triton.jit
def _delta_projection_kernel(
    delta_ptr,  # [S, M, D]
    resid_ptr,  # [L, M, D]
    w_ptr,  # [L, D]
    b_ptr,  # [L, D] (unused unless HAS_BIAS)
    W_ptr,  # [L, D, N]
    out_ptr,  # [S, L, M, N]
    S,
    M,
    D,
    N,
    eps,
    stride_ds,
    stride_dm,
    stride_dd,
    stride_rl,
    stride_rm,
    stride_rd,
    stride_wl,
    stride_wd,
    stride_bl,
    stride_bd,
    stride_Wl,
    stride_Wd,
    stride_Wn,
    stride_os,
    stride_ol,
    stride_om,
    stride_on,
    EXACT: tl.constexpr,
    IS_RMS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    USE_DOT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_sl = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_n = tl.program_id(2)
    s = (pid_sl % S).to(tl.int64)
    l = (pid_sl // S).to(tl.int64)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N

    d_base = delta_ptr + s * stride_ds + offs_m[:, None].to(tl.int64) * stride_dm
    r_base = resid_ptr + l * stride_rl + offs_m[:, None].to(tl.int64) * stride_rm
    w_base = w_ptr + l * stride_wl
    b_base = b_ptr + l * stride_bl
    W_base = W_ptr + l * stride_Wl + offs_n[None, :] * stride_Wn

    # ---- pass 1: row statistics over d_model (fp32) --------------------------------------------
    count = tl.zeros([], dtype=tl.float32)
    mean = tl.zeros([BLOCK_M], dtype=tl.float32)  # LN: running mean of x (exact) / resid (linear)
    m2 = tl.zeros([BLOCK_M], dtype=tl.float32)  # LN: centred sum of squares; RMS: sum of squares
    dsum = tl.zeros([BLOCK_M], dtype=tl.float32)  # linear LN: sum of delta
    for k0 in range(0, D, BLOCK_K):
        ks = k0 + offs_k
        mask_k = ks < D
        mask = mask_m[:, None] & mask_k[None, :]
        r = tl.load(r_base + ks[None, :] * stride_rd, mask=mask, other=0.0).to(tl.float32)
        if EXACT:
            d = tl.load(d_base + ks[None, :] * stride_dd, mask=mask, other=0.0).to(tl.float32)
            x = r + d
        else:
            x = r
            if not IS_RMS:
                d = tl.load(d_base + ks[None, :] * stride_dd, mask=mask, other=0.0).to(tl.float32)
                dsum += tl.sum(d, axis=1)
        count, mean, m2 = merge_row_moments(x, mask_k, tl.minimum(D - k0, BLOCK_K).to(tl.float32), count, mean, m2, IS_RMS)
    rstd = tl.rsqrt(m2 / D + eps)
    dmean = dsum / D

    # ---- pass 2: normalise tile by tile in registers, project through W[l] ---------------------
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        ks = k0 + offs_k
        mask_k = ks < D
        mask = mask_m[:, None] & mask_k[None, :]
        d = tl.load(d_base + ks[None, :] * stride_dd, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(w_base + ks * stride_wd, mask=mask_k, other=0.0).to(tl.float32)
        if EXACT:
            r = tl.load(r_base + ks[None, :] * stride_rd, mask=mask, other=0.0).to(tl.float32)
            x = r + d
            if IS_RMS:
                a = x * rstd[:, None] * w[None, :]
            else:
                a = (x - mean[:, None]) * rstd[:, None] * w[None, :]
                if HAS_BIAS:
                    b = tl.load(b_base + ks * stride_bd, mask=mask_k, other=0.0).to(tl.float32)
                    a += b[None, :]
        else:
            if IS_RMS:
                a = d * rstd[:, None] * w[None, :]
            else:
                a = (d - dmean[:, None]) * rstd[:, None] * w[None, :]
        # Columns past d_model are already zero (w, b load as 0) and W's rows there load as 0.
        Wt = tl.load(W_base + ks[:, None] * stride_Wd, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        if USE_DOT:
            acc = tl.dot(a.to(Wt.dtype), Wt, acc, input_precision=INPUT_PRECISION, out_dtype=tl.float32)
        else:
            acc += tl.sum(a[:, :, None] * Wt.to(tl.float32)[None, :, :], axis=1)

    o_ptrs = (
        out_ptr
        + s * stride_os
        + l * stride_ol
        + offs_m[:, None].to(tl.int64) * stride_om
        + offs_n[None, :] * stride_on
    )
    tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def plan_delta_projection(
    delta: Float[Tensor, "src batch pos d_model"],
    resid: Float[Tensor, "layer batch pos d_model"],
    norm_w: Float[Tensor, "layer d_model"],
    norm_b: Optional[Float[Tensor, "layer d_model"]],
    W: Float[Tensor, "layer d_model n_out"],
    out: Float[Tensor, "src layer batch pos n_out"],
    *,
    mode: str,
    norm: str,
    eps: float,
    block_m: Optional[int] = None,
    block_n: Optional[int] = None,
    block_k: Optional[int] = None,
    allow_tf32: bool = False,
    num_warps: Optional[int] = None,
    num_stages: Optional[int] = None,
    arch: Optional[int] = None,
) -> Launch:
    """The launch ``delta_projection_triton`` makes for these tensors (see ``csrc_triton.launch``).

    Works on ``meta`` tensors: ``bench/kernel_resources.py`` plans with them, passing ``arch``.
    """
    S, B, P, D = delta.shape
    L, N = W.shape[0], W.shape[2]
    M = B * P
    d3 = delta.reshape(S, M, D)
    r3 = resid.reshape(L, M, D)
    o4 = out.view(S, L, M, N)
    has_bias = mode == "exact" and norm == "LN" and norm_b is not None
    b = norm_b if has_bias else norm_w  # any valid pointer; never read without HAS_BIAS
    arch = target_arch(delta, arch)
    config = _default_config(M, D, N, W.dtype, arch)
    BLOCK_M = block_m or config["BLOCK_M"]
    BLOCK_N = block_n or config["BLOCK_N"]
    BLOCK_K = block_k or config["BLOCK_K"]
    check_power_of_two(block_m=BLOCK_M, block_n=BLOCK_N, block_k=BLOCK_K)
    use_dot = min(BLOCK_M, BLOCK_N, BLOCK_K) >= 16
    half = W.dtype in (torch.float16, torch.bfloat16)
    grid = (S * L, triton.cdiv(M, BLOCK_M), triton.cdiv(N, BLOCK_N))
    if grid[1] > MAX_GRID_YZ or grid[2] > MAX_GRID_YZ:
        raise ValueError(f"grid {grid} exceeds the launch limit; use larger block_m / block_n")
    args = (
        d3, r3, norm_w, b, W, o4,
        S, M, D, N, float(eps),
        d3.stride(0), d3.stride(1), d3.stride(2),
        r3.stride(0), r3.stride(1), r3.stride(2),
        norm_w.stride(0), norm_w.stride(1),
        b.stride(0), b.stride(1),
        W.stride(0), W.stride(1), W.stride(2),
        o4.stride(0), o4.stride(1), o4.stride(2), o4.stride(3),
    )
    constexprs = dict(
        EXACT=mode == "exact",
        IS_RMS=norm == "RMS",
        HAS_BIAS=has_bias,
        USE_DOT=use_dot,
        INPUT_PRECISION="tf32" if (allow_tf32 or half) else "ieee",
        BLOCK_M=BLOCK_M,
        BLOCK_N=BLOCK_N,
        BLOCK_K=BLOCK_K,
    )
    return Launch(
        _delta_projection_kernel, grid, args, constexprs,
        num_warps=num_warps or config["num_warps"],
        num_stages=num_stages or config["num_stages"],
        arch=arch,
        notes=dict(S=S, L=L, M=M, D=D, N=N, mode=mode, norm=norm),
    )


def delta_projection_triton(
    delta: Float[Tensor, "src batch pos d_model"],
    resid: Float[Tensor, "layer batch pos d_model"],
    norm_w: Float[Tensor, "layer d_model"],
    norm_b: Optional[Float[Tensor, "layer d_model"]],
    W: Float[Tensor, "layer d_model n_out"],
    *,
    mode: str,
    norm: str,
    eps: float,
    out: Optional[Float[Tensor, "src layer batch pos n_out"]] = None,
    **config: Any,
) -> Float[Tensor, "src layer batch pos n_out"]:
    """Launch ``_delta_projection_kernel``; arguments as ``fastpatch.ops.delta_projection_reference``.

    Shapes are assumed valid (the public function validates them). ``out`` (contiguous,
    ``delta``'s dtype) is written in place when given. ``config`` overrides the plan's choices
    (:func:`plan_delta_projection`: ``block_m``, ``block_n``, ``block_k``, ``allow_tf32``,
    ``num_warps``, ``num_stages``). Block sizes must be powers of two; blocks below 16 fall back
    from ``tl.dot`` to a multiply-sum (used by the interpreter tests to get several tiles on tiny
    shapes). fp32 ``W`` is multiplied in IEEE fp32 unless ``allow_tf32``.
    """
    S, B, P, D = delta.shape
    L, N = W.shape[0], W.shape[2]
    out = output_buffer(out, (S, L, B, P, N), delta.dtype, delta.device)
    if out.numel() == 0:
        return out
    if D == 0:
        return out.zero_()
    plan_delta_projection(delta, resid, norm_w, norm_b, W, out, mode=mode, norm=norm, eps=eps, **config)()
    return out


def _default_config(M: int, D: int, N: int, dtype: torch.dtype, arch: int) -> dict:
    """Blocks, warps and stages per problem size, dtype and architecture (see docs/design-notes.md)."""
    half = dtype in (torch.float16, torch.bfloat16)
    return dict(
        BLOCK_M=64 if M > 32 else pick_block(M, 16, 64),
        BLOCK_N=pick_block(N, 16, 128 if half else 64),
        BLOCK_K=pick_block(D, 16, 64 if half else 32),
        num_warps=4,
        num_stages=3,
    )


def delta_projection_cost(launch: Launch) -> dict:
    """FLOPs and DRAM bytes of one launch (the static roofline of ``bench/kernel_resources.py``).

    With ``e`` the element size and ``T_n = cdiv(N, BLOCK_N)`` the programs along ``n``::

        flops = 2 * S * L * M * D * N              (the dot)
              + 8 * S * L * M * D * T_n            (statistics and normalisation, redone per n tile)
        bytes = e * ((S + L) * M * D + L * (D * N + 2 * D))   (delta, resid, W, w, b read once:
                                                                 repeats are L2 hits)
              + e * S * L * M * N                  (the output, written once)
    """
    n = launch.notes
    S, L, M, D, N = n["S"], n["L"], n["M"], n["D"], n["N"]
    e = launch.args[0].element_size()
    tiles_n = -(-N // launch.constexprs["BLOCK_N"])
    flops = 2 * S * L * M * D * N + 8 * S * L * M * D * tiles_n
    return {"flops": float(flops), "bytes": float(e * ((S + L) * M * D + L * (D * N + 2 * D) + S * L * M * N))}
