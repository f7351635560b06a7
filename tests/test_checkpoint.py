import os

import pytest
import torch

import tinyfusion
from tinyfusion import checkpoint
from tinyfusion.convert import main as convert_main
from tinyfusion.errors import UserError
from tinyfusion.models import config_from_name

from conftest import assert_one_line_error, inputs, run_main, tiny_dit


def same_outputs(a, b):
    x, t, y = inputs(a.config)
    with torch.no_grad():
        torch.testing.assert_close(a(x, t, y), b(x, t, y), atol=0, rtol=0)


@pytest.mark.parametrize("wrap", ["plain", "model", "ema", "module-prefix"])
def test_official_pt_round_trip_strict(tmp_path, wrap):
    """Official-format .pt files (how facebookresearch/DiT saves) load strictly with the config inferred."""
    m = tiny_dit(num_heads=3)
    sd = m.state_dict()
    obj = {"plain": sd, "model": {"model": sd, "opt": {}}, "ema": {"model": {}, "ema": sd},
           "module-prefix": {f"module.{k}": v for k, v in sd.items()}}[wrap]
    if wrap == "model":
        obj = {"model": sd, "args": 3}
    torch.save(obj, tmp_path / "ckpt.pt")
    loaded = tinyfusion.load(str(tmp_path / "ckpt.pt"), num_heads=3)
    assert loaded.config.depth == 3 and loaded.config.hidden_size == 48 and loaded.config.patch_size == 2
    assert loaded.config.input_size == 8 and loaded.config.num_classes == 5 and loaded.config.learn_sigma
    same_outputs(m, loaded)


def test_official_widths_infer_heads(tmp_path):
    """Standard widths need no head count: DiT-S (384) has 6 heads."""
    cfg = config_from_name("DiT-S-D2/4", input_size=8, num_classes=3)
    m = tinyfusion.DiT(cfg)
    torch.save(m.state_dict(), tmp_path / "s.pt")
    assert tinyfusion.load(str(tmp_path / "s.pt")).config.num_heads == 6


def test_safetensors_round_trip_keeps_config_and_provenance(tmp_path):
    m = tiny_dit(num_heads=4, hidden_size=64, class_dropout_prob=0.0)
    tinyfusion.save(m, str(tmp_path / "m.safetensors"), source="unit-test", kept=[0, 2])
    loaded = tinyfusion.load(str(tmp_path / "m.safetensors"))
    assert loaded.config == m.config
    assert loaded.provenance["source"] == "unit-test" and loaded.provenance["kept"] == [0, 2]
    same_outputs(m, loaded)
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp")]


def test_convert_to_official_pt(tmp_path, capsys):
    m = tiny_dit()
    tinyfusion.save(m, str(tmp_path / "m.safetensors"))
    code, out, err = run_main(convert_main, ["--to", "dit", "--ckpt", str(tmp_path / "m.safetensors"), "--out", str(tmp_path / "o.pt")], capsys)
    assert code == 0, err
    raw = torch.load(tmp_path / "o.pt", weights_only=True)
    assert set(raw) == set(m.state_dict())
    same_outputs(m, tinyfusion.load(str(tmp_path / "o.pt"), num_heads=3))


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/tinyfusion-pwned",))


def bad_files(tmp_path):
    m = tiny_dit()
    sd = m.state_dict()
    (tmp_path / "text.pt").write_text("hello, not a checkpoint\n")
    (tmp_path / "garbage.safetensors").write_bytes(os.urandom(256))
    torch.save({"weights": Evil()}, tmp_path / "evil.pt")
    torch.save({"conv1.weight": torch.zeros(3, 3), "fc.bias": torch.zeros(2)}, tmp_path / "resnet.pt")
    sd_shape = dict(sd)
    sd_shape["blocks.1.attn.qkv.weight"] = torch.zeros(10, 48)
    torch.save(sd_shape, tmp_path / "shape.pt")
    sd_extra = dict(sd)
    sd_extra["blocks.0.attn.q_norm.weight"] = torch.zeros(16)
    torch.save(sd_extra, tmp_path / "extra.pt")
    return m


@pytest.mark.parametrize("name,fragment", [
    ("missing.pt", "no such file"),
    ("text.pt", "neither safetensors nor a torch.save file"),  # was "not a safetensors checkpoint" for a .pt
    ("garbage.safetensors", "not a safetensors checkpoint"),
    ("evil.pt", "refused to unpickle"),
    ("resnet.pt", "not a DiT checkpoint: missing keys"),
    ("shape.pt", "shape mismatch at blocks.1.attn.qkv.weight"),
    ("extra.pt", "unexpected 1 keys (blocks.0.attn.q_norm.weight)"),
])
def test_bad_checkpoints_one_line_errors(tmp_path, capsys, name, fragment):
    bad_files(tmp_path)
    out = tmp_path / "out.safetensors"
    code, _, err = run_main(convert_main, ["--to", "dit", "--ckpt", str(tmp_path / name), "--out", str(out), "--num-heads", "3"], capsys)
    assert_one_line_error(code, err, fragment)
    assert not out.exists()
    assert not os.path.exists("/tmp/tinyfusion-pwned")


def test_depth_or_patch_inconsistent_with_weights(tmp_path):
    m = tiny_dit()
    tinyfusion.save(m, str(tmp_path / "m.safetensors"))
    with pytest.raises(UserError, match="depth 28 was asked for but the weights have depth 3"):
        checkpoint.load(str(tmp_path / "m.safetensors"), expect=config_from_name("DiT-XL/2"))
    with pytest.raises(UserError, match="hidden_size"):
        checkpoint.load(str(tmp_path / "m.safetensors"), expect=config_from_name("DiT-S-D3/2"))


def test_diffusers_folder_without_weights(tmp_path):
    (tmp_path / "hf").mkdir()
    with pytest.raises(UserError, match="not a diffusers model folder"):
        checkpoint.load(str(tmp_path / "hf"))
    (tmp_path / "hf" / "config.json").write_text("{}")
    with pytest.raises(UserError, match="no diffusion_pytorch_model"):
        checkpoint.load(str(tmp_path / "hf"))


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    def boom(tmp):
        open(tmp, "w").write("partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        checkpoint.atomic_write(str(tmp_path / "x.bin"), boom)
    assert os.listdir(tmp_path) == []


def test_convert_model_name_checks(tmp_path, capsys):
    tinyfusion.save(tiny_dit(), str(tmp_path / "m.safetensors"))
    base = ["--to", "dit", "--ckpt", str(tmp_path / "m.safetensors"), "--out", str(tmp_path / "o.safetensors")]
    code, _, err = run_main(convert_main, [*base, "--model", "DiT-XL/2"], capsys)
    assert_one_line_error(code, err, "depth 28 was asked for but the weights have depth 3")
    code, _, err = run_main(convert_main, [*base, "--model", "DiT-XXL/2"], capsys)
    assert_one_line_error(code, err, "unknown model name")
    assert not (tmp_path / "o.safetensors").exists()
