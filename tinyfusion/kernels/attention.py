"""Flash-attention forward (no mask, no causality: DiT attends over all tokens).

One program per (query block, batch x head): keys and values stream through in blocks with an online
softmax in fp32, so the N x N scores never reach memory. The head dimension is padded to a power of two
with masked loads (DiT-XL's 72 runs in a 128-wide block), and the last key block's tail is masked to
-inf, so any token count works. q, k, v and o are (B, H, N, d) with any strides.
"""
import triton
import triton.language as tl


@triton.jit
def flash_attention_fwd_kernel(Q, K, V, O, sq_b, sq_h, sq_n, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, so_b, so_h, so_n,
                               H, N, HEAD_DIM, sm_scale, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                               BLOCK_D: tl.constexpr, IEEE: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)  # int64 offsets: b * stride passes 2^31 at DiT-XL/2 batch 2428 (qkv views)
    b = bh // H
    h = bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    q = tl.load(Q + b * sq_b + h * sq_h + offs_m[:, None] * sq_n + offs_d[None, :],
                mask=(offs_m < N)[:, None] & d_ok[None, :], other=0.0)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for start in range(0, N, BLOCK_N):
        kn = start + offs_n
        kv_mask = (kn < N)[:, None] & d_ok[None, :]
        k = tl.load(K + b * sk_b + h * sk_h + kn[:, None] * sk_n + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(V + b * sv_b + h * sv_h + kn[:, None] * sv_n + offs_d[None, :], mask=kv_mask, other=0.0)
        if IEEE:  # fp32 inputs: true fp32 products, not TF32
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = tl.where((kn < N)[None, :], s * sm_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    acc = acc / l_i[:, None]
    tl.store(O + b * so_b + h * so_h + offs_m[:, None] * so_n + offs_d[None, :], acc.to(O.dtype.element_ty),
             mask=(offs_m < N)[:, None] & d_ok[None, :])
