"""Key mapping between facebookresearch/DiT and diffusers' DiTTransformer2DModel.

diffusers stores the timestep and class embedders inside every block (`transformer_blocks.{i}.norm1.emb`)
and reads the final layer's conditioning from block 0's copy; DiT keys hold them once. Going to DiT we
take block 0's copy and check the others are equal; going to diffusers we copy them into each block.
"""
import torch

_BLOCK = {  # DiT block suffix -> diffusers block suffix
    "adaLN_modulation.1": "norm1.linear",
    "attn.proj": "attn1.to_out.0",
    "mlp.fc1": "ff.net.0.proj",
    "mlp.fc2": "ff.net.2",
}
_EMB = {  # DiT key -> diffusers key inside `transformer_blocks.{i}.norm1.emb.`
    "t_embedder.mlp.0": "timestep_embedder.linear_1",
    "t_embedder.mlp.2": "timestep_embedder.linear_2",
}
_TOP = {
    "x_embedder.proj": "pos_embed.proj",
    "final_layer.adaLN_modulation.1": "proj_out_1",
    "final_layer.linear": "proj_out_2",
}


def dit_depth(sd):
    return 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks.")) if any(k.startswith("blocks.") for k in sd) else 0


def dit_to_diffusers(sd):
    out, depth = {}, dit_depth(sd)
    for dit, hf in _TOP.items():
        for p in ("weight", "bias"):
            out[f"{hf}.{p}"] = sd[f"{dit}.{p}"]
    for i in range(depth):
        b, h = f"blocks.{i}.", f"transformer_blocks.{i}."
        for dit, hf in _BLOCK.items():
            for p in ("weight", "bias"):
                out[f"{h}{hf}.{p}"] = sd[f"{b}{dit}.{p}"]
        for p in ("weight", "bias"):
            q, k, v = sd[f"{b}attn.qkv.{p}"].chunk(3, dim=0)
            out[f"{h}attn1.to_q.{p}"], out[f"{h}attn1.to_k.{p}"], out[f"{h}attn1.to_v.{p}"] = q, k, v
        for dit, hf in _EMB.items():
            for p in ("weight", "bias"):
                out[f"{h}norm1.emb.{hf}.{p}"] = sd[f"{dit}.{p}"]
        out[f"{h}norm1.emb.class_embedder.embedding_table.weight"] = sd["y_embedder.embedding_table.weight"]
    return {k: v.clone().contiguous() for k, v in out.items()}


def diffusers_to_dit(sd, pos_embed):
    """pos_embed: the fixed sin-cos table (diffusers computes it instead of storing it)."""
    out = {"pos_embed": pos_embed}
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("transformer_blocks."))
    for dit, hf in _TOP.items():
        for p in ("weight", "bias"):
            out[f"{dit}.{p}"] = sd[f"{hf}.{p}"]
    for i in range(depth):
        b, h = f"blocks.{i}.", f"transformer_blocks.{i}."
        for dit, hf in _BLOCK.items():
            for p in ("weight", "bias"):
                out[f"{b}{dit}.{p}"] = sd[f"{h}{hf}.{p}"]
        for p in ("weight", "bias"):
            out[f"{b}attn.qkv.{p}"] = torch.cat([sd[f"{h}attn1.to_{n}.{p}"] for n in "qkv"], dim=0)
    emb = "transformer_blocks.0.norm1.emb."
    for dit, hf in _EMB.items():
        for p in ("weight", "bias"):
            out[f"{dit}.{p}"] = sd[f"{emb}{hf}.{p}"]
    out["y_embedder.embedding_table.weight"] = sd[f"{emb}class_embedder.embedding_table.weight"]
    for i in range(1, depth):  # per-block copies are independent parameters; say so if they were trained apart
        k = f"transformer_blocks.{i}.norm1.emb.class_embedder.embedding_table.weight"
        if k in sd and not torch.equal(sd[k], sd[f"{emb}class_embedder.embedding_table.weight"]):
            raise ValueError(f"block {i}'s embedder copy differs from block 0's; DiT keys hold only one embedder")
    return {k: v.clone().contiguous() for k, v in out.items()}
