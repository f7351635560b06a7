"""Parity with a real peer: diffusers' DiTTransformer2DModel, in both conversion directions."""
import json
import os

import pytest
import torch

import tinyfusion
from tinyfusion.convert import main as convert_main
from tinyfusion.convert import write_diffusers

from conftest import inputs, run_main, tiny_dit

diffusers = pytest.importorskip("diffusers")


def diffusers_out(model, x, t, y):
    with torch.no_grad():
        return model(x, timestep=t, class_labels=y).sample


def test_tinyfusion_to_diffusers_same_outputs(tmp_path):
    """A random DiT in diffusers' conventions, converted, gives diffusers the same output within 1e-5."""
    ours = tiny_dit(timestep_freq_shift=1, mlp_norm_eps=1e-5)
    write_diffusers(ours, tmp_path / "hf")
    theirs = diffusers.DiTTransformer2DModel.from_pretrained(tmp_path / "hf").eval()
    x, t, y = inputs(ours.config, n=4)
    with torch.no_grad():
        torch.testing.assert_close(diffusers_out(theirs, x, t, y), ours(x, t, y), atol=1e-5, rtol=1e-5)


def test_diffusers_to_tinyfusion_same_outputs(tmp_path, capsys):
    """A diffusers-native random model, saved with save_pretrained, loads in tinyfusion with equal outputs."""
    torch.manual_seed(0)
    theirs = diffusers.DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=3,
        sample_size=8, patch_size=2, num_embeds_ada_norm=7,
    )
    with torch.no_grad():
        for p in theirs.parameters():
            p.normal_(0, 0.05)
        for blk in theirs.transformer_blocks[1:]:  # diffusers keeps a copy per block; they start equal
            blk.norm1.emb.load_state_dict(theirs.transformer_blocks[0].norm1.emb.state_dict())
    theirs.eval().save_pretrained(tmp_path / "hf")
    ours = tinyfusion.load(str(tmp_path / "hf"))
    assert ours.config.depth == 3 and ours.config.num_classes == 7 and ours.config.num_heads == 2
    x, t, y = inputs(ours.config, n=4)
    with torch.no_grad():
        torch.testing.assert_close(ours(x, t, y), diffusers_out(theirs, x, t, y), atol=1e-5, rtol=1e-5)

    # ... and back to diffusers through the CLI, then to DiT keys as safetensors: same outputs throughout.
    code, _, err = run_main(convert_main, ["--to", "dit", "--ckpt", str(tmp_path / "hf"), "--out", str(tmp_path / "m.safetensors")], capsys)
    assert code == 0, err
    again = tinyfusion.load(str(tmp_path / "m.safetensors"))
    code, _, err = run_main(convert_main, ["--to", "diffusers", "--ckpt", str(tmp_path / "m.safetensors"), "--out", str(tmp_path / "hf2")], capsys)
    assert code == 0, err
    theirs2 = diffusers.DiTTransformer2DModel.from_pretrained(tmp_path / "hf2").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(x, t, y), ours(x, t, y), atol=0, rtol=0)
        torch.testing.assert_close(diffusers_out(theirs2, x, t, y), ours(x, t, y), atol=1e-5, rtol=1e-5)


def test_diverged_embedder_copies_are_refused(tmp_path, capsys):
    ours = tiny_dit(timestep_freq_shift=1)
    write_diffusers(ours, tmp_path / "hf")
    from safetensors.torch import load_file, save_file

    path = tmp_path / "hf" / "diffusion_pytorch_model.safetensors"
    sd = load_file(path)
    sd["transformer_blocks.2.norm1.emb.class_embedder.embedding_table.weight"] += 1
    save_file(sd, path)
    code, _, err = run_main(convert_main, ["--to", "dit", "--ckpt", str(tmp_path / "hf"), "--out", str(tmp_path / "x.safetensors")], capsys)
    assert code == 2 and "differs from block 0" in err
    assert not os.path.exists(tmp_path / "x.safetensors")


def test_official_convention_written_config(tmp_path):
    """Converting an original-convention DiT records its MLP LayerNorm eps for diffusers."""
    ours = tiny_dit()
    write_diffusers(ours, tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["norm_eps"] == 1e-6 and cfg["num_layers"] == 3 and cfg["num_embeds_ada_norm"] == 5
