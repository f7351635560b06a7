"""A DiT forward over fused ops: the `cpp` backend (C++ CPU ops) and the `triton` backend (Triton kernels).

Per block: one fused LayerNorm+modulate pass before attention (carried over from the previous block),
GEMMs through PyTorch, attention through the backend's attention, then `x += gate * (branch + bias)`
fused with the next LayerNorm+modulate, and bias+GELU in place on the fc1 output. The adaLN projections
of all blocks and of the final layer are one GEMM per forward. Both backends pass the same ops:
ln_modulate, residual_ln_modulate_ and bias_gelu_, and an attention (B, H, N, d) -> (B, N, H, d).
"""
import torch
import torch.nn.functional as F


def sdpa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2)  # CPU SDPA's output is (B, N, H, d) in memory


class FusedForward:
    def __init__(self, model, ops, attention=sdpa):
        self.ops, self.attention, self.model = ops, attention, model
        blocks = list(model.blocks)
        ada = [b.adaLN_modulation[1] for b in blocks] + [model.final_layer.adaLN_modulation[1]]
        self.ada_weight = torch.cat([m.weight for m in ada]).t()  # (D, L*6D + 2D): one GEMM for every block
        self.ada_bias = torch.cat([m.bias for m in ada])
        self.eps1 = 1e-6
        self.eps2 = blocks[0].norm2.eps if blocks else 1e-6

    def __call__(self, x, t, y):
        m, ops = self.model, self.ops
        tokens = (m.x_embedder(x) + m.pos_embed).contiguous()  # (B, N, D), updated in place below
        B, N, D = tokens.shape
        H = m.num_heads
        c = m.t_embedder(t).to(tokens.dtype) + m.y_embedder(y, False)
        mods = torch.addmm(self.ada_bias, F.silu(c), self.ada_weight)  # (B, L*6D + 2D)

        def mod(k):  # k-th (B, D) modulation row block: a strided view, unit stride along D
            return mods[:, k * D:(k + 1) * D]

        h = ops.ln_modulate(tokens, mod(0), mod(1), self.eps1)  # the final layer's shift/scale when depth is 0
        for i, blk in enumerate(m.blocks):
            qkv = torch.addmm(blk.attn.qkv.bias, h.view(B * N, D), blk.attn.qkv.weight.t())
            q, k, v = qkv.view(B, N, 3, H, D // H).permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, N, d) views
            a = self.attention(q, k, v).reshape(B * N, D)
            branch = torch.mm(a, blk.attn.proj.weight.t()).view(B, N, D)
            ops.residual_ln_modulate_(tokens, branch, blk.attn.proj.bias, mod(6 * i + 2), mod(6 * i + 3),
                                      mod(6 * i + 4), self.eps2)
            hidden = torch.mm(branch.view(B * N, D), blk.mlp.fc1.weight.t())
            ops.bias_gelu_(hidden, blk.mlp.fc1.bias)
            branch = torch.mm(hidden, blk.mlp.fc2.weight.t()).view(B, N, D)
            nxt = 6 * (i + 1)  # the next block's norm1 shift/scale, or the final layer's after the last block
            ops.residual_ln_modulate_(tokens, branch, blk.mlp.fc2.bias, mod(6 * i + 5), mod(nxt), mod(nxt + 1),
                                      self.eps1)
            h = branch
        out = torch.addmm(m.final_layer.linear.bias, h.view(B * N, D), m.final_layer.linear.weight.t())
        return m.unpatchify(out.view(B, N, -1))
