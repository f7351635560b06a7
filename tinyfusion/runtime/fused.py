"""A DiT forward over fused ops: the `cpp` backend (C++ CPU ops) and the `triton` backend (Triton kernels).

Per block: one fused LayerNorm+modulate pass before attention (carried over from the previous block),
GEMMs through PyTorch, attention through the backend's attention, then `x += gate * (branch + bias)`
fused with the next LayerNorm+modulate, and bias+GELU in place on the fc1 output. The adaLN projections
of all blocks and of the final layer are one GEMM per forward. Both backends pass the same ops:
ln_modulate, residual_ln_modulate_ and bias_gelu_, and an attention (B, H, N, d) -> (B, N, H, d).

On the CPU every GEMM (the blocks', the one adaLN GEMM and the final layer's) goes through oneDNN
(`torch.ops.mkldnn._linear_pointwise`, the kernel Inductor's CPU freezing path emits) with the weights
reordered once into its blocked layout and tanh-GELU as the fc1 GEMM's post-op: PyTorch's default addmm
first copies the broadcast bias into its output, a separate GELU pass reads and writes the widest
activation again, and at the adaLN GEMM's 8 rows it runs 4x slower (measured in docs/runtime.md).
"""
import torch
import torch.nn.functional as F

from .fp8 import Fp8Gemms, block_linears


def sdpa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2)  # CPU SDPA's output is (B, N, H, d) in memory


class TorchGemms:
    """The block GEMMs through PyTorch (any device): addmm/mm, then the backend's in-place bias+GELU."""

    def __init__(self, ops):
        self.ops = ops

    def linear(self, x, layer, bias=True):
        return torch.addmm(layer.bias, x, layer.weight.t()) if bias else torch.mm(x, layer.weight.t())

    def linear_gelu(self, x, layer):
        h = torch.mm(x, layer.weight.t())
        self.ops.bias_gelu_(h, layer.bias)
        return h


class OneDNNGemms:
    """GEMMs through oneDNN on the CPU, the weights of `linears` reordered once (at load)."""

    def __init__(self, linears):
        reorder = torch.ops.mkldnn._reorder_linear_weight
        self.packed = {id(m): reorder(m.weight.detach(), None) for m in linears}

    def linear(self, x, layer, bias=True):
        return torch.ops.mkldnn._linear_pointwise(x, self.packed[id(layer)], layer.bias if bias else None, "none", [], "")

    def linear_gelu(self, x, layer):
        return torch.ops.mkldnn._linear_pointwise(x, self.packed[id(layer)], layer.bias, "gelu", [], "tanh")


def onednn_available(model):
    p = next(model.parameters())
    return p.device.type == "cpu" and p.dtype == torch.float32 and torch.backends.mkldnn.is_available()


def concatenated_linear(linears):
    """One Linear computing every one of `linears` (same input) side by side: their outputs concatenated."""
    weight = torch.cat([m.weight.detach() for m in linears])
    out = torch.nn.Linear(weight.shape[1], weight.shape[0], device="meta")  # no initialization to overwrite
    out.weight = torch.nn.Parameter(weight, requires_grad=False)
    out.bias = torch.nn.Parameter(torch.cat([m.bias.detach() for m in linears]), requires_grad=False)
    return out


class FusedForward:
    def __init__(self, model, ops, attention=sdpa, onednn=False, fp8=False, fuse_quantization=True):
        """onednn: every GEMM through oneDNN where the model is fp32 on the CPU (else through PyTorch).
        fp8: the block GEMMs in FP8 (runtime/fp8.py); adaLN and the final layer stay in the model's dtype.
        fuse_quantization: with ops that have the E4M3 variants (Triton), the kernels before each FP8 GEMM
        write its input quantized (False: quantized in PyTorch, the cpp backend's way)."""
        self.ops, self.attention, self.model = ops, attention, model
        self.quantized = fp8 and fuse_quantization and hasattr(ops, "residual_ln_modulate_e4m3_")
        blocks = list(model.blocks)
        # (D, L*6D + 2D): every block's adaLN projection and the final layer's, one GEMM per forward
        self.ada = concatenated_linear([b.adaLN_modulation[1] for b in blocks]
                                       + [model.final_layer.adaLN_modulation[1]])
        edges = [self.ada, model.final_layer.linear]  # outside the blocks: never FP8
        if onednn and onednn_available(model):
            self.plain_gemms = OneDNNGemms(edges + ([] if fp8 else list(block_linears(model))))
        else:
            self.plain_gemms = TorchGemms(ops)
        self.gemms = Fp8Gemms(model, ops, fused=self.quantized) if fp8 else self.plain_gemms
        self.eps1 = 1e-6
        self.eps2 = blocks[0].norm2.eps if blocks else 1e-6

    def __call__(self, x, t, y):
        m, ops = self.model, self.ops
        tokens = (m.x_embedder(x) + m.pos_embed).contiguous()  # (B, N, D), updated in place below
        B, N, D = tokens.shape
        H = m.num_heads
        c = m.t_embedder(t).to(tokens.dtype) + m.y_embedder(y, False)
        mods = self.plain_gemms.linear(F.silu(c), self.ada)  # (B, L*6D + 2D)

        def mod(k):  # k-th (B, D) modulation row block: a strided view, unit stride along D
            return mods[:, k * D:(k + 1) * D]

        depth = len(m.blocks)
        # h: the next GEMM's input, (B*N, D) rows or their (E4M3, scales); the final layer's input is never quantized
        if self.quantized and depth:
            h = ops.ln_modulate_e4m3(tokens, mod(0), mod(1), self.eps1)
        else:  # the final layer's shift/scale when depth is 0
            h = ops.ln_modulate(tokens, mod(0), mod(1), self.eps1).view(B * N, D)
        gemm = self.gemms
        for i, blk in enumerate(m.blocks):
            qkv = gemm.linear(h, blk.attn.qkv)
            q, k, v = qkv.view(B, N, 3, H, D // H).permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, N, d) views
            a = self.attention(q, k, v).reshape(B * N, D)
            branch = gemm.linear(a, blk.attn.proj, bias=False).view(B, N, D)  # the bias joins the residual
            h = self.residual_norm(tokens, branch, blk.attn.proj.bias, mod(6 * i + 2), mod(6 * i + 3),
                                   mod(6 * i + 4), self.eps2, self.quantized)
            hidden = gemm.linear_gelu(h, blk.mlp.fc1)
            branch = gemm.linear(hidden, blk.mlp.fc2, bias=False).view(B, N, D)
            nxt = 6 * (i + 1)  # the next block's norm1 shift/scale, or the final layer's after the last block
            h = self.residual_norm(tokens, branch, blk.mlp.fc2.bias, mod(6 * i + 5), mod(nxt), mod(nxt + 1),
                                   self.eps1, self.quantized and i + 1 < depth)
        out = self.plain_gemms.linear(h, m.final_layer.linear)
        return m.unpatchify(out.view(B, N, -1))

    def residual_norm(self, tokens, branch, bias, gate, shift, scale, eps, quantize):
        """tokens += gate * (branch + bias), then the next GEMM's input LN(tokens) * (1 + scale) + shift:
        written over branch as (B*N, D) rows, or (quantize) as E4M3 rows and their scales."""
        if quantize:
            return self.ops.residual_ln_modulate_e4m3_(tokens, branch, bias, gate, shift, scale, eps)
        self.ops.residual_ln_modulate_(tokens, branch, bias, gate, shift, scale, eps)
        return branch.view(-1, branch.shape[-1])
