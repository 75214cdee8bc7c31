"""Split-KV ("flash-decoding") attention of one new token per sequence against the fixed-size KV cache.

The plain path (``KVCache.attend`` in ``inference_state.py``, its oracle) is SDPA with a length mask: a single query
per sequence gets one thread block per head, each streaming every cached key, so at long contexts (7b: 32 heads,
100k cached positions) a few blocks do all the reading. Here the keys are cut into chunks of ``SPLIT`` positions,
one program per (sequence, head, chunk):

    s[n]  = scale * q . k[n]                 for n <= pos (the sequence's own position), else -inf
    m_c   = max_n s[n],  l_c = sum_n exp(s[n] - m_c),  a_c = sum_n exp(s[n] - m_c) v[n]       per chunk c

and a few torch ops combine the chunks: ``out = sum_c exp(m_c - M) a_c / sum_c exp(m_c - M) l_c``, ``M = max_c m_c``.
Accumulation in fp32, output in the query's dtype. Grouped-query heads read their group's key/value head.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

SPLIT = 512  # keys per program
_EMPTY = -1.0e30  # running max of a chunk with no valid key: finite, so exp(_EMPTY - _EMPTY) is no NaN


@triton.jit
def _split_kv_kernel(q_ptr, k_ptr, v_ptr, pos_ptr, m_ptr, l_ptr, a_ptr, H, GROUP, N, NUM_SPLITS, scale,
                     sqb, sqh, skb, skh, skn, svb, svh, svn,
                     D: tl.constexpr, SPLIT: tl.constexpr, BLOCK_N: tl.constexpr, EMPTY: tl.constexpr):
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    kvh = (h // GROUP).to(tl.int64)
    d = tl.arange(0, D)
    q = tl.load(q_ptr + b * sqb + h * sqh + d).to(tl.float32)
    pos = tl.load(pos_ptr + b)
    m_i = tl.full([1], EMPTY, tl.float32)
    l_i = tl.zeros([1], tl.float32)
    acc = tl.zeros([D], tl.float32)
    for off in range(0, SPLIT, BLOCK_N):
        n = split * SPLIT + off + tl.arange(0, BLOCK_N)
        valid = (n <= pos) & (n < N)
        k = tl.load(k_ptr + b * skb + kvh * skh + n[:, None].to(tl.int64) * skn + d[None, :],
                    mask=valid[:, None], other=0.0).to(tl.float32)
        s = tl.where(valid, tl.sum(k * q[None, :], axis=1) * scale, float("-inf"))  # (BLOCK_N,)
        m_new = tl.maximum(m_i, tl.max(s, axis=0))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new)  # 0 where masked
        v = tl.load(v_ptr + b * svb + kvh * svh + n[:, None].to(tl.int64) * svn + d[None, :],
                    mask=valid[:, None], other=0.0).to(tl.float32)
        acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
        l_i = l_i * alpha + tl.sum(p, axis=0)
        m_i = m_new
    idx = bh * NUM_SPLITS + split
    tl.store(m_ptr + idx + tl.arange(0, 1), m_i)
    tl.store(l_ptr + idx + tl.arange(0, 1), l_i)
    tl.store(a_ptr + idx * D + d, acc)


def split_kv_decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                              scale: float | None = None) -> torch.Tensor:
    """``q`` (b, heads, 1, d) against cached ``k``/``v`` (b, kv_heads, n, d) (any strides with a unit last one),
    keys ``0..positions[i]`` of sequence ``i`` -> (b, heads, 1, d) in ``q``'s dtype."""
    b, H, L, D = q.shape
    Hkv, N = k.shape[1], k.shape[2]
    if L != 1 or H % Hkv or D & (D - 1) or k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError(f"split-KV decode needs one query, grouped heads and a power-of-two head size with "
                         f"contiguous rows; got q {tuple(q.shape)}, k {tuple(k.shape)}")
    q = q.contiguous()
    num_splits = triton.cdiv(N, SPLIT)
    m = torch.empty(b * H, num_splits, device=q.device, dtype=torch.float32)
    l_sum = torch.empty_like(m)
    acc = torch.empty(b * H, num_splits, D, device=q.device, dtype=torch.float32)
    _split_kv_kernel[(b * H, num_splits)](
        q, k, v, positions.contiguous(), m, l_sum, acc, H, H // Hkv, N, num_splits,
        float(scale if scale is not None else D ** -0.5),
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        D=D, SPLIT=SPLIT, BLOCK_N=64, EMPTY=_EMPTY)
    w = torch.exp(m - m.amax(dim=1, keepdim=True))  # (b*H, splits); empty chunks weigh 0
    out = (w[..., None] * acc).sum(1) / (w * l_sum).sum(1, keepdim=True)
    return out.view(b, H, 1, D).to(q.dtype)
