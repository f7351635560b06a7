import math

import pytest
import torch

from tinyfusion.models import DiT, config_from_name
from tinyfusion.models.dit import timestep_embedding

from conftest import inputs, tiny_config, tiny_dit

# A sample of facebookresearch/DiT's state-dict names (models.py with timm's PatchEmbed/Attention/Mlp).
OFFICIAL_KEYS = [
    "pos_embed", "x_embedder.proj.weight", "x_embedder.proj.bias",
    "t_embedder.mlp.0.weight", "t_embedder.mlp.2.bias", "y_embedder.embedding_table.weight",
    "blocks.0.attn.qkv.weight", "blocks.0.attn.proj.bias", "blocks.0.mlp.fc1.weight", "blocks.0.mlp.fc2.bias",
    "blocks.0.adaLN_modulation.1.weight", "final_layer.linear.weight", "final_layer.adaLN_modulation.1.bias",
]


@pytest.mark.parametrize("name,width,heads,depth,patch", [
    ("DiT-XL/2", 1152, 16, 28, 2), ("DiT-L/4", 1024, 16, 24, 4), ("DiT-B/8", 768, 12, 12, 8),
    ("DiT-S/2", 384, 6, 12, 2), ("DiT-XL-D14/2", 1152, 16, 14, 2), ("DiT-XL-D7/2", 1152, 16, 7, 2),
])
def test_family_names(name, width, heads, depth, patch):
    c = config_from_name(name)
    assert (c.hidden_size, c.num_heads, c.depth, c.patch_size) == (width, heads, depth, patch)


@pytest.mark.parametrize("bad", ["DiT-XXL/2", "DiT-XL/3", "ViT-B/16", "DiT-XL", "DiT-XL-Dx/2"])
def test_unknown_names_raise(bad):
    with pytest.raises(ValueError, match="unknown model name"):
        config_from_name(bad)


def test_dit_xl2_parameter_count_and_keys():
    """DiT-XL/2 at 256px has 675,129,632 parameters (facebookresearch/DiT prints this number)."""
    with torch.device("meta"):
        model = DiT(config_from_name("DiT-XL/2"))
    assert sum(p.numel() for p in model.parameters()) == 675_129_632
    keys = set(model.state_dict())
    assert set(OFFICIAL_KEYS) <= keys
    assert len([k for k in keys if k.startswith("blocks.27.")]) == 10  # qkv, proj, fc1, fc2, adaLN: weight + bias


def test_forward_shapes_and_learned_sigma():
    m = tiny_dit()
    x, t, y = inputs(m.config)
    assert m(x, t, y).shape == (3, 8, 8, 8)
    m2 = tiny_dit(learn_sigma=False)
    assert m2(x, t, y).shape == x.shape


@torch.no_grad()
def test_every_block_of_the_test_models_matters():
    """The shared test model (conftest.tiny_dit): dropping any one block, or swapping two, moves the output
    by more than a third of its norm, so parity tests at 1e-3 see a lost or reordered block."""
    m = tiny_dit(depth=3)
    x, t, y = inputs(m.config)
    full, blocks = m(x, t, y), m.blocks
    orders = [[j for j in range(3) if j != i] for i in range(3)] + [[1, 0, 2], [0, 2, 1]]
    for order in orders:
        m.blocks = torch.nn.ModuleList(blocks[j] for j in order)
        assert (m(x, t, y) - full).norm() > full.norm() / 3, order
    m.blocks = blocks


def test_fresh_model_is_identity_blocks_and_zero_output():
    """adaLN-Zero: a freshly initialized DiT outputs zeros and every block is the identity."""
    m = DiT(tiny_config()).eval()
    x, t, y = inputs(m.config)
    assert torch.count_nonzero(m(x, t, y)) == 0
    h, c = m.embed(x, t, y)
    assert torch.equal(m.blocks[0](h, c), h)


def test_timestep_embedding_matches_formula():
    t = torch.tensor([0.0, 17.0, 999.0])
    emb = timestep_embedding(t, 8)
    freqs = [math.exp(-math.log(10000) * i / 4) for i in range(4)]
    want = [[math.cos(v * f) for f in freqs] + [math.sin(v * f) for f in freqs] for v in t.tolist()]
    torch.testing.assert_close(emb, torch.tensor(want), atol=1e-5, rtol=1e-5)


def test_class_dropout_and_null_label():
    m = tiny_dit()
    x, t, y = inputs(m.config)
    null = torch.full_like(y, m.config.num_classes)
    forced = m(x, t, y, force_drop_ids=torch.ones_like(y))
    torch.testing.assert_close(forced, m(x, t, null))
    m.train()
    m.y_embedder.dropout_prob = 1.0
    torch.testing.assert_close(m(x, t, y), forced)


def test_cfg_conventions():
    """'all' guides every eps channel; 3 (facebookresearch) leaves the 4th eps channel unguided."""
    m = tiny_dit()
    x, t, y = inputs(m.config, n=2)
    xx, tt = torch.cat([x, x]), torch.cat([t, t])
    yy = torch.cat([y, torch.full_like(y, m.config.num_classes)])
    cond, uncond = m(x, t, y), m(x, t, yy[2:])
    scale = 4.0
    guided = uncond + scale * (cond - uncond)
    out_all = m.forward_with_cfg(xx, tt, yy, scale)[:2]
    out_fb = m.forward_with_cfg(xx, tt, yy, scale, guidance_channels=3)[:2]
    torch.testing.assert_close(out_all[:, :4], guided[:, :4], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_all[:, 4:], cond[:, 4:], atol=1e-5, rtol=1e-5)  # outputs of order 1
    torch.testing.assert_close(out_fb[:, :3], guided[:, :3], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_fb[:, 3:], cond[:, 3:], atol=1e-5, rtol=1e-5)


def test_invalid_geometry_raises():
    with pytest.raises(ValueError, match="divisible"):
        DiT(tiny_config(num_heads=5))
    with pytest.raises(ValueError, match="divisible"):
        DiT(tiny_config(input_size=9))
