"""MAR: official names and sizes, the loss, generation, and depth pruning of both stacks."""
import pytest
import torch

from conftest import failure
from tinyfusion.checkpoint import load_mar
from tinyfusion.errors import UserError
from tinyfusion.models.mar import MAR, MARConfig, config_from_state_dict
from tinyfusion.models.stack import block_stack
from tinyfusion.pruning.surgery import fixed_mask


def tiny_mar(seed=0, **kw):
    torch.manual_seed(seed)
    base = dict(img_size=8, vae_stride=1, patch_size=2, vae_embed_dim=1, encoder_embed_dim=32, encoder_depth=4,
                encoder_num_heads=2, decoder_embed_dim=32, decoder_depth=4, decoder_num_heads=2, class_num=10,
                class_rows=10, buffer_size=2, diffloss_d=2, diffloss_w=32, diffusion_batch_mul=2)
    base.update(kw)
    m = MAR(MARConfig(**base))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # the head starts at zero output; random weights make every path do work
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return m.eval()


def test_mar_large_has_the_published_size_and_official_names():
    # MAR-L in the paper: 479M parameters (encoder and decoder 16 x 1024, diffusion head 8 x 1280).
    cfg = MARConfig(encoder_embed_dim=1024, encoder_depth=16, decoder_embed_dim=1024, decoder_depth=16,
                    diffloss_d=8, diffloss_w=1280)
    with torch.device("meta"):
        m = MAR(cfg)
    assert sum(p.numel() for p in m.parameters()) / 1e6 == pytest.approx(479, abs=1)
    keys = set(m.state_dict())
    for k in ("class_emb.weight", "fake_latent", "z_proj_ln.bias", "encoder_pos_embed_learned", "encoder_blocks.15.attn.qkv.weight",
              "encoder_blocks.0.mlp.fc2.bias", "decoder_embed.weight", "mask_token", "decoder_blocks.0.norm2.weight",
              "diffusion_pos_embed_learned", "diffloss.net.time_embed.mlp.2.weight", "diffloss.net.cond_embed.weight",
              "diffloss.net.res_blocks.7.adaLN_modulation.1.weight", "diffloss.net.final_layer.linear.weight"):
        assert k in keys, k
    assert config_from_state_dict(m.state_dict()) == cfg  # every size read back from the keys


def test_official_checkpoint_layout_loads(tmp_path):
    m = tiny_mar()
    torch.save({"model": {k: torch.zeros_like(v) for k, v in m.state_dict().items()}, "model_ema": m.state_dict()},
               tmp_path / "checkpoint-last.pth")
    loaded = load_mar(str(tmp_path / "checkpoint-last.pth"), patch_size=2, vae_stride=1, encoder_num_heads=2,
                      decoder_num_heads=2, class_num=10)
    for k, v in m.state_dict().items():  # the EMA weights, not the raw ones
        assert torch.equal(loaded.state_dict()[k], v)
    torch.save({"model": {"x": torch.zeros(1)}}, tmp_path / "bad.pth")
    with pytest.raises(UserError, match="not a MAR checkpoint"):
        load_mar(str(tmp_path / "bad.pth"))


def test_loss_is_finite_masked_and_trains_every_part():
    m = tiny_mar().train()
    g = torch.Generator().manual_seed(0)
    images, labels = torch.randn(4, 1, 8, 8, generator=g), torch.randint(0, 10, (4,), generator=g)
    from tinyfusion.diffusion.mar import MARObjective

    terms = MARObjective().training_losses(lambda x, seeds: m(x, seeds, labels), images, torch.tensor([3, 3, 900, 5]))
    out = terms["output"]
    assert out["loss"].shape == (4,) and torch.isfinite(out["loss"]).all()
    with torch.no_grad():  # the same seeds give the same masks and noised tokens: a teacher and a student compare
        m.eval()
        a, b = m(images, terms["model_t"], labels), m(images, terms["model_t"], labels)
        assert torch.equal(a["output"], b["output"]) and torch.equal(a["mask"], b["mask"])
        assert not torch.equal(a["output"], m(images, terms["model_t"] + 1, labels)["output"])
        m.train()
    assert out["mask"].sum(1).unique().numel() == 1 and out["mask"].float().mean() >= 0.7 - 1 / 16  # min mask ratio 0.7
    out["loss"].mean().backward()
    for name in ("encoder_blocks.0.attn.qkv.weight", "decoder_blocks.3.mlp.fc1.weight", "diffloss.net.input_proj.weight",
                 "class_emb.weight"):
        assert m.get_parameter(name).grad.abs().sum() > 0, name
    # known tokens reach the encoder only when the drawn ratio leaves some unmasked
    assert (m.z_proj.weight.grad.abs().sum() > 0) == bool((~out["mask"]).any())


def test_generation_is_seeded_guided_and_fills_every_token():
    m = tiny_mar()
    labels = torch.tensor([1, 4])
    a = m.sample(labels, num_iter=4, cfg=2.0, temperature=1.0, head_steps=5, seed=3)
    assert a.shape == (2, 1, 8, 8) and torch.isfinite(a).all() and (a != 0).all()
    assert torch.equal(a, m.sample(labels, num_iter=4, cfg=2.0, head_steps=5, seed=3))
    assert not torch.allclose(a, m.sample(labels, num_iter=4, cfg=1.0, head_steps=5, seed=3))
    assert not torch.allclose(a, m.sample(labels, num_iter=4, cfg=2.0, temperature=0.5, head_steps=5, seed=3))


def test_clip_tokens_keeps_pixel_tokens_in_range_where_the_raw_head_blows_up():
    m = tiny_mar()
    labels = torch.tensor([0, 7])
    raw = m.sample(labels, num_iter=4, head_steps=20, seed=1)
    assert raw.abs().max() > 10  # an inexact eps at alpha_bar ~ 1e-8 is multiplied ~1e4 (see MARConfig)
    m.config.clip_tokens = True
    clipped = m.sample(labels, num_iter=4, head_steps=20, seed=1)
    assert clipped.abs().max() <= 1 and torch.isfinite(clipped).all() and clipped.std() > 0.1


@torch.no_grad()
def test_pruned_mar_equals_the_masked_full_model():
    m = tiny_mar()
    stack = block_stack(m)
    assert stack.family == "MAR" and stack.depths == [4, 4]
    stack.check_groups([[1, 2], [1, 2], [1, 2], [1, 2]])
    with pytest.raises(UserError, match="straddles"):
        stack.check_groups([[3, 6], [1, 2]])
    g = torch.Generator().manual_seed(1)
    tokens, labels = torch.randn(3, 16, 4, generator=g), torch.tensor([0, 5, 9])
    mask = torch.zeros(3, 16, dtype=torch.bool)
    mask[:, ::2] = True
    kept = [0, 3, 5, 6]  # encoder 0 and 3, decoder 1 and 2
    with stack.masked(fixed_mask(kept, 8, 3)):
        want = m.predict_z(tokens, mask, labels)
    shallow = stack.prune(kept)
    assert (shallow.config.encoder_depth, shallow.config.decoder_depth) == (2, 2)
    torch.testing.assert_close(shallow.predict_z(tokens, mask, labels), want)
    assert not torch.allclose(m.predict_z(tokens, mask, labels), want, atol=1e-4)


def test_prune_finetune_sample_and_evaluate_with_model_mar(tmp_path, capsys):
    import json

    import tinyfusion
    from conftest import run_main
    from tinyfusion.evaluate import main as evaluate_main
    from tinyfusion.finetune import main as finetune_main
    from tinyfusion.prune import main as prune_main
    from tinyfusion.sample import main as sample_main

    teacher = tmp_path / "mar.safetensors"
    tinyfusion.save(tiny_mar(), str(teacher))
    out = tmp_path / "prune"
    code, _, err = run_main(prune_main, ["--ckpt", str(teacher), "--model", "mar", "--steps", "4", "--global-batch-size", "8",
                                         "--calib-samples", "16", "--out", str(out)], capsys)
    assert code == 0, err
    d = json.loads((out / "decision.json").read_text())
    assert d["groups"] == [[1, 2]] * 4 and len(d["kept"]) == 4  # 1:2 over the encoder and the decoder each
    pruned = tinyfusion.load(str(out / "pruned.safetensors"))
    assert type(pruned).__name__ == "MAR" and (pruned.config.encoder_depth, pruned.config.decoder_depth) == (2, 2)
    rec = tmp_path / "rec"
    code, _, err = run_main(finetune_main, ["--ckpt", str(out / "pruned.safetensors"), "--steps", "2", "--global-batch-size", "8",
                                            "--log-every", "1", "--eval-samples", "0", "--out", str(rec)], capsys)
    assert code == 0, err
    m = json.loads((rec / "metrics.json").read_text())
    assert m["objective"] == "mar" and {"output_kd", "hidden_kd", "diffusion"} <= set(m["loss_curve"][0])
    assert all(v == v for p in m["loss_curve"] for v in p.values())  # finite
    code, _, err = run_main(sample_main, ["--ckpt", str(rec / "recovered.safetensors"), "--per-class", "1", "--classes", "0,1",
                                          "--steps", "3", "--temperature", "0.9", "--out", str(tmp_path / "g.png")], capsys)
    assert code == 0, err
    code, out_text, err = run_main(evaluate_main, ["--ckpt", str(teacher), "--samples", "20", "--steps", "2", "--json",
                                                   str(tmp_path / "e.json")], capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "e.json").read_text())["sampler"]["name"] == "mar"
    code, _, err = run_main(sample_main, ["--ckpt", str(teacher), "--model", "sit", "--out", str(tmp_path / "x.png")], capsys)
    assert code == 2 and "is a MAR checkpoint" in err
    code, _, err = run_main(sample_main, ["--ckpt", str(teacher), "--backend", "cpp", "--out", str(tmp_path / "x.png")], capsys)
    assert code == 2 and "runs eager or onnxruntime" in err


def test_torchrun_two_gloo_ranks_train_prune_and_finetune_a_mar(tmp_path):
    """DDP over MAR: train (from the preset), the learnable search and Masked KD. Each rank draws its own mask
    ratio (one per batch, as official MAR does per GPU), so unlike DiT the decision may differ from one rank's."""
    import json

    import tinyfusion
    from conftest import run_module
    from conftest import torchrun as launcher

    def torchrun(*args):
        return run_module([*launcher(2), *args])

    res = torchrun("-m", "tinyfusion.train", "--preset", "digits-mar", "--steps", "3", "--global-batch-size", "8",
                   "--results-dir", str(tmp_path), "--name", "t")
    assert res.returncode == 0, failure(res)
    assert json.loads((tmp_path / "t" / "metrics.json").read_text())["world_size"] == 2
    teacher = tmp_path / "mar.safetensors"
    tinyfusion.save(tiny_mar(), str(teacher))
    args = ["--ckpt", str(teacher), "--model", "mar", "--steps", "6", "--global-batch-size", "8", "--calib-samples", "16",
            "--seed", "3"]
    two = torchrun("-m", "tinyfusion.prune", *args, "--out", str(tmp_path / "two"))
    assert two.returncode == 0, failure(two)
    d = json.loads((tmp_path / "two" / "decision.json").read_text())
    assert d["groups"] == [[1, 2]] * 4 and len(d["kept"]) == 4 and d["history"][-1]["step"] == 6
    assert all(h["loss"] == h["loss"] for h in d["history"])  # finite
    res = torchrun("-m", "tinyfusion.finetune", "--ckpt", str(tmp_path / "two" / "pruned.safetensors"), "--steps", "2",
                   "--global-batch-size", "8", "--eval-samples", "0", "--out", str(tmp_path / "rec"))
    assert res.returncode == 0, failure(res)
    m = json.loads((tmp_path / "rec" / "metrics.json").read_text())
    assert m["objective"] == "mar" and len(m["loss_curve"]) >= 1 and m["run"]["world_size"] == 2
    assert all(v == v for p in m["loss_curve"] for v in p.values())  # finite
    # the ranks' work reached the weights: the pruned file holds the decided layers, the recovered EMA moved
    # away from it (an all-reduce that dropped every gradient, or an EMA never updated, leaves them equal)
    pruned = tinyfusion.load(str(tmp_path / "two" / "pruned.safetensors"))
    recovered = tinyfusion.load(str(tmp_path / "rec" / "recovered.safetensors"))
    assert pruned.provenance["kept"] == d["kept"] and recovered.provenance["kept"] == d["kept"]
    a, b = pruned.state_dict(), recovered.state_dict()
    assert a.keys() == b.keys()
    moved = [k for k in a if not torch.equal(a[k], b[k])]
    assert moved and all(torch.isfinite(b[k]).all() for k in b)


@torch.no_grad()
def test_static_shape_encoder_decoder_equals_the_gathering_one():
    m = tiny_mar()
    g = torch.Generator().manual_seed(4)
    tokens, labels = torch.randn(3, 16, 4, generator=g), torch.tensor([1, 2, 10])  # 10 = the null class
    order = torch.argsort(torch.rand(3, 16, generator=g), dim=1)
    for n in (0, 5, 16):  # nothing masked, some, all
        mask = torch.zeros(3, 16, dtype=torch.bool).scatter_(1, order[:, :n], True)
        torch.testing.assert_close(m.predict_z_static(tokens, mask, labels), m.predict_z(tokens, mask, labels),
                                   rtol=1e-5, atol=1e-5)
    counts = torch.zeros(3, 16, dtype=torch.bool)  # a different count per sample: one gathered call each
    for i, n in enumerate((3, 9, 14)):
        counts[i, order[i, :n]] = True
    want = torch.cat([m.predict_z(tokens[i:i + 1], counts[i:i + 1], labels[i:i + 1]) for i in range(3)])
    torch.testing.assert_close(m.predict_z_static(tokens, counts, labels), want, rtol=1e-5, atol=1e-5)


def test_onnx_export_of_a_pruned_mar_and_sampling_through_onnxruntime(tmp_path):
    import json

    import tinyfusion
    from test_export import run_tool as tool
    from tinyfusion import runtime

    stack = block_stack(tiny_mar())
    pruned = stack.prune([0, 2, 4, 7])
    ckpt = tmp_path / "pruned.safetensors"
    tinyfusion.save(pruned, str(ckpt))
    r = tool("onnx.py", "--ckpt", str(ckpt), "--out", str(tmp_path / "onnx"))
    assert r.returncode == 0, failure(r)
    report = json.loads((tmp_path / "onnx" / "parity.json").read_text())
    assert report["onnx"] == ["mar_z.onnx", "mar_head.onnx"]
    assert set(report["parity"]["onnxruntime"]) == {"z_batch2", "head_rows6", "z_batch5", "head_rows15", "sample"}
    for m in report["parity"]["onnxruntime"].values():
        assert m["max_abs"] < 1e-4 and m["cosine"] > 0.99999
    rt = runtime.load(str(ckpt), "onnxruntime")
    labels = torch.tensor([3, 3, 8])
    with torch.no_grad():
        got = rt.sample(labels, num_iter=5, cfg=2.0, head_steps=8, seed=2)
        want = tinyfusion.load(str(ckpt)).sample(labels, num_iter=5, cfg=2.0, head_steps=8, seed=2)
    assert rt.backend == "onnxruntime" and (got - want).abs().max() < 1e-4 * max(1.0, want.abs().max().item())
    r = tool("onnx.py", "--ckpt", str(ckpt), "--out", str(tmp_path / "x"), "--cfg")
    assert r.returncode == 2 and "without --cfg" in r.stderr and "Traceback" not in r.stderr
    r = tool("trt.py", "--ckpt", str(ckpt), "--out", str(tmp_path / "y"))
    assert r.returncode == 2 and "the TensorRT path covers DiT and SiT" in r.stderr and "Traceback" not in r.stderr


def test_mar_samples_under_autocast_in_low_precision():
    """A MAR draws fp32 noise and token state inside its own loop: in low precision it runs under autocast
    (fp32 weights, GEMMs in bf16), its samples near the fp32 ones, the caller's model untouched. (fp16
    goes through the same wrapper; CPU autocast's fp16 GEMMs are slow, so the GPU run covers it.)"""
    dtype = torch.bfloat16
    from tinyfusion import runtime
    from tinyfusion.diffusion import sample

    m = tiny_mar()
    labels = torch.tensor([0, 1, 2])
    want = sample(m, labels, None, "mar", 4, cfg_scale=1.5, seed=3)
    got = sample(runtime.load(m, "eager", dtype=dtype), labels, None, "mar", 4, cfg_scale=1.5, seed=3)
    assert got.dtype == torch.float32 and next(m.parameters()).dtype == torch.float32
    assert ((got - want).abs().max() / want.abs().max()).item() < 5e-2
