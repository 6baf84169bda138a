"""Flash attention forward + backward in Triton: causal or not, native GQA, any length.

Layout: q [B, H, T, D], k/v [B, Hkv, S, D], H a multiple of Hkv. Any strides in the first
three dims (views from a transpose are fine); the last dim must be contiguous (copied if not).
Head dims up to 128; a dim that is not a power of two (96) is padded to the next one in
registers with masks, never in memory. Accumulation is fp32; the forward saves the
logsumexp (base 2, [B, H, T] fp32) for the backward.

Backward: a preprocess computes delta = rowsum(dO * O); then one kernel per K/V block
accumulates dK/dV over every query head of its group (no atomics, K/V never repeated) and a
second kernel per query block computes dQ.

Causal masking is top-left aligned (key j visible to query i iff j <= i), which is what
training needs and equals the reference's bottom-right mask when T == S. The dispatcher sends
causal calls with T != S (decode against a KV cache) to the reference.

Wrapped as torch.library custom ops ("minillm_kernels::flash_attn_fwd" / "..._bwd") with fake
and autograd registrations, so torch.compile keeps them as opaque nodes in one graph.
"""
import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from .utils import INTERPRET, device_guard, dot_precision, next_pow2

LOG2E = 1.4426950408889634


# ----------------------------------------------------------------------------------------
# configs: one small config under the interpreter; on a GPU a few candidates per head-dim
# class, autotuned on first use per (head dim, causal, length bucket, dtype). Nothing runs
# at import.
# ----------------------------------------------------------------------------------------
def _cfg(num_warps, num_stages, **blocks):
    return triton.Config(blocks, num_warps=num_warps, num_stages=num_stages)


if INTERPRET:
    _FWD = {"small": [_cfg(4, 1, BLOCK_M=32, BLOCK_N=16)]}
    _DKDV = {"small": [_cfg(4, 1, BLOCK_M=16, BLOCK_N=32)]}
    _DQ = {"small": [_cfg(4, 1, BLOCK_M=32, BLOCK_N=16)]}
else:
    # Candidates per head dim: "small" for head dims <= 64, "large" for 96 and 128 (padded to
    # 128). Every one compiles for sm_90a without spilling registers, uses wgmma and fits in
    # shared memory: `python -m benchmarks.sm90_report --only attn` checks it (Triton 3.9's
    # ptxas; a 4-warp dK/dV program at head dim 128 spilled up to 3 KB per thread). Invariant
    # the causal loop split relies on: the outer block is a multiple of the inner one.
    _FWD = {
        "small": [_cfg(4, 3, BLOCK_M=128, BLOCK_N=64), _cfg(8, 3, BLOCK_M=128, BLOCK_N=64),
                  _cfg(8, 3, BLOCK_M=128, BLOCK_N=128), _cfg(4, 4, BLOCK_M=128, BLOCK_N=32),
                  _cfg(4, 3, BLOCK_M=64, BLOCK_N=64)],
        "large": [_cfg(8, 3, BLOCK_M=128, BLOCK_N=64), _cfg(8, 2, BLOCK_M=128, BLOCK_N=64),
                  _cfg(8, 2, BLOCK_M=128, BLOCK_N=128), _cfg(8, 4, BLOCK_M=128, BLOCK_N=32),
                  _cfg(4, 3, BLOCK_M=64, BLOCK_N=64)],
    }
    _DKDV = {
        "small": [_cfg(8, 3, BLOCK_M=32, BLOCK_N=128), _cfg(8, 2, BLOCK_M=64, BLOCK_N=128),
                  _cfg(8, 3, BLOCK_M=16, BLOCK_N=128), _cfg(4, 3, BLOCK_M=32, BLOCK_N=64),
                  _cfg(8, 3, BLOCK_M=32, BLOCK_N=64)],
        "large": [_cfg(8, 2, BLOCK_M=32, BLOCK_N=128), _cfg(8, 3, BLOCK_M=16, BLOCK_N=128),
                  _cfg(8, 2, BLOCK_M=16, BLOCK_N=64), _cfg(8, 3, BLOCK_M=16, BLOCK_N=64)],
    }
    _DQ = {
        "small": [_cfg(4, 3, BLOCK_M=128, BLOCK_N=32), _cfg(8, 3, BLOCK_M=128, BLOCK_N=64),
                  _cfg(4, 3, BLOCK_M=64, BLOCK_N=64), _cfg(4, 4, BLOCK_M=64, BLOCK_N=32)],
        "large": [_cfg(8, 3, BLOCK_M=128, BLOCK_N=32), _cfg(8, 3, BLOCK_M=128, BLOCK_N=64),
                  _cfg(4, 3, BLOCK_M=64, BLOCK_N=64), _cfg(4, 4, BLOCK_M=64, BLOCK_N=32),
                  _cfg(8, 3, BLOCK_M=128, BLOCK_N=16)],
    }


def _configs_for(table):
    """All candidates (what autotune is given) and a pruner keeping the head dim's class."""
    def prune(configs, named_args, **kwargs):
        return table.get("small" if kwargs["BLOCK_D"] <= 64 else "large", table["small"])
    union = list({str(c): c for group in table.values() for c in group}.values())
    return dict(configs=union, prune_configs_by={"early_config_prune": prune})


_KEY = ["HEAD_DIM", "CAUSAL", "SEQ_BUCKET"]


# ----------------------------------------------------------------------------------------
# tiles: [rows, BLOCK_D] loads and stores, masked only where they can run off the tensor
# ----------------------------------------------------------------------------------------
@triton.jit
def _tile_mask(offs_r, n_rows, offs_d, HEAD_DIM: tl.constexpr, CHECK_ROWS: tl.constexpr):
    mask = offs_d[None, :] < HEAD_DIM
    if CHECK_ROWS:
        mask = (offs_r[:, None] < n_rows) & mask
    return mask


@triton.jit
def _load_tile(base, stride, offs_r, n_rows, offs_d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
               CHECK_ROWS: tl.constexpr):
    """A [rows, BLOCK_D] tile, unmasked when it cannot run off the tensor (rows within n_rows
    and head dim 64 or 128): no predicate per element, fewer registers."""
    ptrs = base + offs_r[:, None] * stride + offs_d[None, :]
    if CHECK_ROWS or HEAD_DIM != BLOCK_D:
        tile = tl.load(ptrs, mask=_tile_mask(offs_r, n_rows, offs_d, HEAD_DIM, CHECK_ROWS), other=0.0)
    else:
        tile = tl.load(ptrs)
    return tile


@triton.jit
def _store_tile(base, stride, offs_r, n_rows, offs_d, value, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    tl.store(base + offs_r[:, None] * stride + offs_d[None, :], value.to(base.dtype.element_ty),
             mask=_tile_mask(offs_r, n_rows, offs_d, HEAD_DIM, True))


@triton.jit
def _query_block(H, GROUP, BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr):
    """(batch·head index, batch, head, K/V head, first query row) of a query-block program (forward
    and dQ). Causal grids run the heaviest (last) query blocks first: better tail balance."""
    pid_m = tl.program_id(0)
    if CAUSAL:
        pid_m = tl.num_programs(0) - 1 - pid_m
    pid_bh = tl.program_id(1).to(tl.int64)
    h = pid_bh % H
    return pid_bh, pid_bh // H, h, h // GROUP, pid_m * BLOCK_M


# ----------------------------------------------------------------------------------------
# forward
# ----------------------------------------------------------------------------------------
@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, offs_m, offs_d,
               lo, hi, S, qk_scale,
               BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, MASK: tl.constexpr,
               CAUSAL: tl.constexpr, PRECISION: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_tile(k_base, stride_kt, offs_n, S, offs_d, HEAD_DIM, BLOCK_D, MASK)
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        if MASK:
            valid = offs_n[None, :] < S
            if CAUSAL:
                valid = valid & (offs_n[None, :] <= offs_m[:, None])
            qk = tl.where(valid, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.math.exp2(qk - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_tile(v_base, stride_vt, offs_n, S, offs_d, HEAD_DIM, BLOCK_D, MASK)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.autotune(key=_KEY, **_configs_for(_FWD))
@triton.jit
def _attn_fwd(Q, K, V, O, LSE, qk_scale,
              stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
              stride_vb, stride_vh, stride_vt, stride_ob, stride_oh, stride_ot,
              H, T, S, GROUP, SEQ_BUCKET,
              HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr,
              PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_bh, b, h, hkv, start_m = _query_block(H, GROUP, BLOCK_M, CAUSAL)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_tile(Q + b * stride_qb + h * stride_qh, stride_qt, offs_m, T, offs_d, HEAD_DIM, BLOCK_D, True)
    k_base = K + b * stride_kb + hkv * stride_kh
    v_base = V + b * stride_vb + hkv * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if CAUSAL:  # (T == S) keys left of the diagonal block need no mask
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt,
                                   offs_m, offs_d, 0, start_m, S, qk_scale,
                                   BLOCK_N, HEAD_DIM, BLOCK_D, False, CAUSAL, PRECISION)
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt,
                                   offs_m, offs_d, start_m, tl.minimum(start_m + BLOCK_M, S), S,
                                   qk_scale, BLOCK_N, HEAD_DIM, BLOCK_D, True, CAUSAL, PRECISION)
    else:
        s_full = (S // BLOCK_N) * BLOCK_N
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt,
                                   offs_m, offs_d, 0, s_full, S, qk_scale,
                                   BLOCK_N, HEAD_DIM, BLOCK_D, False, CAUSAL, PRECISION)
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt,
                                   offs_m, offs_d, s_full, S, S, qk_scale,
                                   BLOCK_N, HEAD_DIM, BLOCK_D, True, CAUSAL, PRECISION)
    acc = acc / l_i[:, None]
    _store_tile(O + b * stride_ob + h * stride_oh, stride_ot, offs_m, T, offs_d, acc, HEAD_DIM, BLOCK_D)
    tl.store(LSE + pid_bh * T + offs_m, m_i + tl.math.log2(l_i), mask=offs_m < T)


# ----------------------------------------------------------------------------------------
# backward
# ----------------------------------------------------------------------------------------
@triton.jit
def _bwd_preprocess(O, DO, DELTA, stride_ob, stride_oh, stride_ot, stride_db, stride_dh, stride_dt,
                    H, T, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    o = _load_tile(O + b * stride_ob + h * stride_oh, stride_ot, offs_m, T, offs_d, HEAD_DIM, BLOCK_D, True)
    do = _load_tile(DO + b * stride_db + h * stride_dh, stride_dt, offs_m, T, offs_d, HEAD_DIM, BLOCK_D, True)
    tl.store(DELTA + pid_bh * T + offs_m, tl.sum(o.to(tl.float32) * do.to(tl.float32), 1), mask=offs_m < T)


@triton.jit
def _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot,
                    offs_n, offs_d, lo, hi, T, qk_scale,
                    BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                    CHECK_ROWS: tl.constexpr, DIAGONAL: tl.constexpr, PRECISION: tl.constexpr):
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q = _load_tile(q_base, stride_qt, offs_m, T, offs_d, HEAD_DIM, BLOCK_D, CHECK_ROWS)
        do = _load_tile(do_base, stride_dot, offs_m, T, offs_d, HEAD_DIM, BLOCK_D, CHECK_ROWS)
        if CHECK_ROWS:  # rows past T get lse = +inf, so their probabilities are exactly 0
            lse = tl.load(lse_base + offs_m, mask=offs_m < T, other=float("inf"))
            delta = tl.load(delta_base + offs_m, mask=offs_m < T, other=0.0)
        else:
            lse = tl.load(lse_base + offs_m)
            delta = tl.load(delta_base + offs_m)
        qkT = tl.dot(k, tl.trans(q), input_precision=PRECISION)
        pT = tl.math.exp2(qkT * qk_scale - lse[None, :])
        if DIAGONAL:
            pT = tl.where(offs_m[None, :] >= offs_n[:, None], pT, 0.0)
        dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=PRECISION)
        dpT = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        dsT = pT * (dpT - delta[None, :])
        dk = tl.dot(dsT.to(q.dtype), q, dk, input_precision=PRECISION)
    return dk, dv


@triton.autotune(key=_KEY, **_configs_for(_DKDV))
@triton.jit
def _attn_bwd_dkdv(Q, K, V, DO, LSE, DELTA, DK, DV, sm_scale, qk_scale,
                   stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
                   stride_vb, stride_vh, stride_vt, stride_dob, stride_doh, stride_dot,
                   stride_dkb, stride_dkh, stride_dkt, stride_dvb, stride_dvh, stride_dvt,
                   H, HKV, T, S, GROUP, SEQ_BUCKET,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr,
                   PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_bk = tl.program_id(1).to(tl.int64)
    b = pid_bk // HKV
    hkv = pid_bk % HKV
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    k = _load_tile(K + b * stride_kb + hkv * stride_kh, stride_kt, offs_n, S, offs_d, HEAD_DIM, BLOCK_D, True)
    v = _load_tile(V + b * stride_vb + hkv * stride_vh, stride_vt, offs_n, S, offs_d, HEAD_DIM, BLOCK_D, True)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    # every query head of this K/V head's group adds into the same dK/dV registers
    for g in range(GROUP):
        h = hkv * GROUP + g
        q_base = Q + b * stride_qb + h * stride_qh
        do_base = DO + b * stride_dob + h * stride_doh
        lse_base = LSE + (b * H + h) * T
        delta_base = DELTA + (b * H + h) * T
        # one loop per kind of block, each extra loop costs registers (ptxas, sm_90a): the
        # diagonal block needs the causal mask, the blocks below it (or all, non-causal) only
        # the row check of the last block
        if CAUSAL:  # (T == S)
            dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base,
                                     stride_qt, stride_dot, offs_n, offs_d,
                                     start_n, tl.minimum(start_n + BLOCK_N, T), T, qk_scale,
                                     BLOCK_M, HEAD_DIM, BLOCK_D, True, True, PRECISION)
            lo = start_n + BLOCK_N
        else:
            lo = 0
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base,
                                 stride_qt, stride_dot, offs_n, offs_d, lo, T, T, qk_scale,
                                 BLOCK_M, HEAD_DIM, BLOCK_D, True, False, PRECISION)
    dk = dk * sm_scale
    _store_tile(DK + b * stride_dkb + hkv * stride_dkh, stride_dkt, offs_n, S, offs_d, dk, HEAD_DIM, BLOCK_D)
    _store_tile(DV + b * stride_dvb + hkv * stride_dvh, stride_dvt, offs_n, S, offs_d, dv, HEAD_DIM, BLOCK_D)


@triton.jit
def _bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, offs_m, offs_d,
                  lo, hi, S, qk_scale,
                  BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, MASK: tl.constexpr,
                  CAUSAL: tl.constexpr, PRECISION: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_tile(k_base, stride_kt, offs_n, S, offs_d, HEAD_DIM, BLOCK_D, MASK)
        v = _load_tile(v_base, stride_vt, offs_n, S, offs_d, HEAD_DIM, BLOCK_D, MASK)
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        p = tl.math.exp2(qk * qk_scale - lse[:, None])
        if MASK:
            valid = offs_n[None, :] < S
            if CAUSAL:
                valid = valid & (offs_n[None, :] <= offs_m[:, None])
            p = tl.where(valid, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION)
    return dq


@triton.autotune(key=_KEY, **_configs_for(_DQ))
@triton.jit
def _attn_bwd_dq(Q, K, V, DO, LSE, DELTA, DQ, sm_scale, qk_scale,
                 stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
                 stride_vb, stride_vh, stride_vt, stride_dob, stride_doh, stride_dot,
                 stride_dqb, stride_dqh, stride_dqt,
                 H, T, S, GROUP, SEQ_BUCKET,
                 HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr,
                 PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_bh, b, h, hkv, start_m = _query_block(H, GROUP, BLOCK_M, CAUSAL)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < T
    q = _load_tile(Q + b * stride_qb + h * stride_qh, stride_qt, offs_m, T, offs_d, HEAD_DIM, BLOCK_D, True)
    do = _load_tile(DO + b * stride_dob + h * stride_doh, stride_dot, offs_m, T, offs_d, HEAD_DIM, BLOCK_D, True)
    lse = tl.load(LSE + pid_bh * T + offs_m, mask=row_ok, other=float("inf"))
    delta = tl.load(DELTA + pid_bh * T + offs_m, mask=row_ok, other=0.0)
    k_base = K + b * stride_kb + hkv * stride_kh
    v_base = V + b * stride_vb + hkv * stride_vh
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if CAUSAL:
        dq = _bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, offs_m, offs_d,
                           0, start_m, S, qk_scale, BLOCK_N, HEAD_DIM, BLOCK_D, False, CAUSAL, PRECISION)
        dq = _bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, offs_m, offs_d,
                           start_m, tl.minimum(start_m + BLOCK_M, S), S, qk_scale,
                           BLOCK_N, HEAD_DIM, BLOCK_D, True, CAUSAL, PRECISION)
    else:
        s_full = (S // BLOCK_N) * BLOCK_N
        dq = _bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, offs_m, offs_d,
                           0, s_full, S, qk_scale, BLOCK_N, HEAD_DIM, BLOCK_D, False, CAUSAL, PRECISION)
        dq = _bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, offs_m, offs_d,
                           s_full, S, S, qk_scale, BLOCK_N, HEAD_DIM, BLOCK_D, True, CAUSAL, PRECISION)
    dq = dq * sm_scale
    _store_tile(DQ + b * stride_dqb + h * stride_dqh, stride_dqt, offs_m, T, offs_d, dq, HEAD_DIM, BLOCK_D)


# ----------------------------------------------------------------------------------------
# launchers + custom ops
# ----------------------------------------------------------------------------------------
MAX_HEAD_DIM = 128


def supported(q, k, v, causal):
    """Whether the Triton kernel handles these inputs (the dispatcher falls back otherwise)."""
    if not (q.dim() == k.dim() == v.dim() == 4):
        return False
    T, S, D = q.shape[2], k.shape[2], q.shape[3]
    return (k.shape == v.shape and q.shape[0] == k.shape[0] and q.device == k.device == v.device
            and q.shape[1] % k.shape[1] == 0 and k.shape[3] == D and 0 < D <= MAX_HEAD_DIM
            and T > 0 and S > 0 and (T == S or not causal)
            and q.dtype in (torch.float16, torch.bfloat16, torch.float32)
            and q.dtype == k.dtype == v.dtype)


def _last_dim_contiguous(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def _meta(q, k):
    B, H, T, D = q.shape
    return dict(H=H, T=T, S=k.shape[2], GROUP=H // k.shape[1], SEQ_BUCKET=next_pow2(max(T, k.shape[2])),
                HEAD_DIM=D, BLOCK_D=max(16, next_pow2(D)), PRECISION=dot_precision(q.dtype))


@torch.library.custom_op("minillm_kernels::flash_attn_fwd", mutates_args=())
def flash_attn_fwd(q: Tensor, k: Tensor, v: Tensor, causal: bool, sm_scale: float) -> tuple[Tensor, Tensor]:
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    B, H, T, D = q.shape
    o = torch.empty_like(q)  # keeps q's layout: a [B, T, H, D] view stays one, so o_proj needs no copy
    lse = torch.empty(B, H, T, device=q.device, dtype=torch.float32)
    m = _meta(q, k)
    grid = lambda meta: (triton.cdiv(T, meta["BLOCK_M"]), B * H)  # noqa: E731
    with device_guard(q):
        _attn_fwd[grid](q, k, v, o, lse, sm_scale * LOG2E,
                        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *o.stride()[:3],
                        m["H"], m["T"], m["S"], m["GROUP"], m["SEQ_BUCKET"],
                        HEAD_DIM=D, BLOCK_D=m["BLOCK_D"], CAUSAL=causal, PRECISION=m["PRECISION"])
    return o, lse


@flash_attn_fwd.register_fake
def _(q, k, v, causal, sm_scale):
    B, H, T, D = q.shape
    return torch.empty_like(q), q.new_empty(B, H, T, dtype=torch.float32)


@torch.library.custom_op("minillm_kernels::flash_attn_bwd", mutates_args=())
def flash_attn_bwd(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor,
                   causal: bool, sm_scale: float) -> tuple[Tensor, Tensor, Tensor]:
    do, q, k, v, o = (_last_dim_contiguous(t) for t in (do, q, k, v, o))
    B, H, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    m = _meta(q, k)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    delta = torch.empty_like(lse)
    qk_scale = sm_scale * LOG2E
    with device_guard(q):
        pre_block = 64 if not INTERPRET else 32
        _bwd_preprocess[(triton.cdiv(T, pre_block), B * H)](
            o, do, delta, *o.stride()[:3], *do.stride()[:3], H, T,
            HEAD_DIM=D, BLOCK_D=m["BLOCK_D"], BLOCK_M=pre_block)
        common = dict(HEAD_DIM=D, BLOCK_D=m["BLOCK_D"], CAUSAL=causal, PRECISION=m["PRECISION"])
        _attn_bwd_dkdv[lambda meta: (triton.cdiv(S, meta["BLOCK_N"]), B * Hkv)](
            q, k, v, do, lse, delta, dk, dv, sm_scale, qk_scale,
            *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3],
            *dk.stride()[:3], *dv.stride()[:3],
            H, Hkv, T, S, m["GROUP"], m["SEQ_BUCKET"], **common)
        _attn_bwd_dq[lambda meta: (triton.cdiv(T, meta["BLOCK_M"]), B * H)](
            q, k, v, do, lse, delta, dq, sm_scale, qk_scale,
            *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3], *dq.stride()[:3],
            H, T, S, m["GROUP"], m["SEQ_BUCKET"], **common)
    return dq, dk, dv


@flash_attn_bwd.register_fake
def _(do, q, k, v, o, lse, causal, sm_scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, causal, sm_scale = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse)
    ctx.causal, ctx.sm_scale = causal, sm_scale


def _backward(ctx, do, dlse):
    q, k, v, o, lse = ctx.saved_tensors
    dq, dk, dv = flash_attn_bwd(do, q, k, v, o, lse, ctx.causal, ctx.sm_scale)
    return dq, dk, dv, None, None


flash_attn_fwd.register_autograd(_backward, setup_context=_setup_context)


def flash_attention(q, k, v, causal=True, sm_scale=None):
    """q [B, H, T, D], k/v [B, Hkv, S, D] -> [B, H, T, D]; causal needs T == S (see `supported`)."""
    if not supported(q, k, v, causal):
        raise ValueError(f"flash_attention does not take q {tuple(q.shape)} {q.dtype}, k {tuple(k.shape)} "
                         f"{k.dtype}, v {tuple(v.shape)}, causal={causal}: use {__package__}.dispatch.attention, "
                         f"which falls back to the reference")
    if sm_scale is None:
        sm_scale = 1.0 / math.sqrt(q.shape[-1])
    o, _ = flash_attn_fwd(q, k, v, causal, sm_scale)
    return o
