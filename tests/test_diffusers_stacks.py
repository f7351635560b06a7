"""Depth pruning of diffusers transformers through the block-stack adapter, on tiny random configs.

For every class: the pruned model saves as a diffusers folder, loads back with from_pretrained, and
equals the full model run with the same fixed mask (the hooks of `stack.masked`)."""
import pytest
import torch

from tinyfusion.errors import UserError
from tinyfusion.models.diffusers_stacks import load_folder
from tinyfusion.models.stack import block_stack
from tinyfusion.pruning.surgery import fixed_mask

diffusers = pytest.importorskip("diffusers")


def randomize(model, seed=0, std=0.1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model.eval()


def tied_dit():
    m = randomize(diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                                  num_layers=4, sample_size=8, patch_size=2, num_embeds_ada_norm=10))
    for b in m.transformer_blocks[1:]:  # as converted DiT checkpoints: one embedder, copied into every block
        b.norm1.emb.load_state_dict(m.transformer_blocks[0].norm1.emb.state_dict())
    return m


def dit_inputs(g, b=2):
    return dict(hidden_states=torch.randn(b, 4, 8, 8, generator=g), timestep=torch.tensor([10, 700]),
                class_labels=torch.tensor([1, 7]))


def pixart():
    return randomize(diffusers.PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                                        out_channels=8, num_layers=4, cross_attention_dim=16, sample_size=8,
                                                        patch_size=2, caption_channels=12, use_additional_conditions=False))


def pixart_inputs(g, b=2):
    return dict(hidden_states=torch.randn(b, 4, 8, 8, generator=g), encoder_hidden_states=torch.randn(b, 5, 12, generator=g),
                timestep=torch.tensor([10, 700]), added_cond_kwargs={"resolution": None, "aspect_ratio": None})


def sd3(**kw):
    return randomize(diffusers.SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=4,
                                                     attention_head_dim=8, num_attention_heads=2, joint_attention_dim=12,
                                                     caption_projection_dim=16, pooled_projection_dim=10, out_channels=4,
                                                     pos_embed_max_size=8, **kw))


def sd3_inputs(g, b=2):
    return dict(hidden_states=torch.randn(b, 4, 8, 8, generator=g), encoder_hidden_states=torch.randn(b, 5, 12, generator=g),
                pooled_projections=torch.randn(b, 10, generator=g), timestep=torch.tensor([10.0, 700.0]))


def flux():
    return randomize(diffusers.FluxTransformer2DModel(patch_size=1, in_channels=8, num_layers=2, num_single_layers=4,
                                                      attention_head_dim=8, num_attention_heads=2, joint_attention_dim=12,
                                                      pooled_projection_dim=10, guidance_embeds=False, axes_dims_rope=(2, 2, 4)))


def flux_inputs(g, b=2):
    img_ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(4.0), indexing="ij"), -1).reshape(16, 3)
    return dict(hidden_states=torch.randn(b, 16, 8, generator=g), encoder_hidden_states=torch.randn(b, 5, 12, generator=g),
                pooled_projections=torch.randn(b, 10, generator=g), timestep=torch.tensor([0.1, 0.7]),
                img_ids=img_ids, txt_ids=torch.zeros(5, 3))


CASES = {
    "dit": (tied_dit, dit_inputs, [1, 3]),  # drops block 0: allowed because the embedders are tied
    "pixart": (pixart, pixart_inputs, [0, 2]),
    "sd3": (sd3, sd3_inputs, [0, 2]),  # drops the context-pre-only last block: block 2 is converted
    "sd3.5": (lambda: sd3(dual_attention_layers=(0, 1), qk_norm="rms_norm"), sd3_inputs, [1, 3]),
    "flux": (flux, flux_inputs, [1, 2, 4]),  # one double-stream block, two single-stream blocks
}


@torch.no_grad()
@pytest.mark.parametrize("name", sorted(CASES))
def test_pruned_folder_loads_and_equals_the_masked_full_model(tmp_path, name):
    build, make_inputs, kept = CASES[name]
    full = build()
    stack = block_stack(full)
    kwargs = make_inputs(torch.Generator().manual_seed(1))
    with stack.masked(fixed_mask(kept, stack.depth, 2)):
        want = full(**kwargs, return_dict=False)[0]
    unmasked = full(**kwargs, return_dict=False)[0]
    assert not torch.allclose(want, unmasked, atol=1e-4)  # the mask really removes blocks

    shallow = stack.prune(kept)
    assert block_stack(shallow).depth == len(kept)
    torch.testing.assert_close(shallow(**kwargs, return_dict=False)[0], want, atol=1e-5, rtol=1e-5)
    shallow.save_pretrained(tmp_path / "pruned")
    loaded = load_folder(str(tmp_path / "pruned"))
    assert type(loaded) is type(full) and block_stack(loaded).depths == block_stack(shallow).depths
    torch.testing.assert_close(loaded(**kwargs, return_dict=False)[0], want, atol=1e-5, rtol=1e-5)
    # the full model is untouched by pruning and by the hooks
    torch.testing.assert_close(full(**kwargs, return_dict=False)[0], unmasked)


@torch.no_grad()
def test_recording_sees_both_flux_streams_and_scores_the_image_stream():
    m = flux()
    stack = block_stack(m)
    assert stack.depths == [2, 4] and stack.family == "Flux"
    with stack.recording(range(stack.depth), inputs=True) as rec:
        m(**flux_inputs(torch.Generator().manual_seed(1)), return_dict=False)
    assert sorted(rec) == list(range(6))
    for i in range(5):  # each block's input is the previous block's output (image stream)
        torch.testing.assert_close(rec[i + 1][0], rec[i][1])
    assert rec[0][1].shape == (2, 16, 16)


def test_groups_must_not_straddle_flux_stacks_and_untied_dit_keeps_block_0():
    stack = block_stack(flux())
    stack.check_groups([[1, 2], [2, 4]])
    with pytest.raises(UserError, match="straddles the boundary at layer 2"):
        stack.check_groups([[1, 3], [2, 3]])
    with pytest.raises(UserError, match="every stack must keep"):
        stack.prune([0, 1])
    untied = randomize(diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                                       num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=10))
    with pytest.raises(UserError, match="keep block 0"):
        block_stack(untied).prune([1])


def test_bad_models_and_folders(tmp_path):
    with pytest.raises(UserError, match="tried the DiT/SiT"):
        block_stack(torch.nn.Linear(2, 2))
    unet = diffusers.UNet2DModel(sample_size=8, block_out_channels=(8,), down_block_types=("DownBlock2D",),
                                 up_block_types=("UpBlock2D",), norm_num_groups=4, layers_per_block=1)
    with pytest.raises(UserError, match="UNet2DModel.*PixArtTransformer2DModel"):
        block_stack(unet)
    with pytest.raises(UserError, match="no config.json"):
        load_folder(str(tmp_path))
    unet.save_pretrained(tmp_path / "unet")
    with pytest.raises(UserError, match="has no block-stack adapter"):
        load_folder(str(tmp_path / "unet"))


class RandomLatents:
    """Seeded latent batches with prompt-row labels (the data interface the search reads)."""

    def __init__(self, shape, rows, batch=8, seed=0):
        self.g, self.shape, self.rows, self.batch = torch.Generator().manual_seed(seed), shape, rows, batch

    def next(self):
        return torch.randn(self.batch, *self.shape, generator=self.g), torch.randint(0, self.rows, (self.batch,), generator=self.g)

    def state(self):
        return self.g.get_state()

    def load_state(self, s):
        self.g.set_state(s)


def bank(rows=4, tokens=5, width=12, pooled=10, seed=3):
    g = torch.Generator().manual_seed(seed)
    return {"encoder_hidden_states": torch.randn(rows + 1, tokens, width, generator=g),
            "pooled_projections": torch.randn(rows + 1, pooled, generator=g)}


DENOISERS = {
    "dit": (tied_dit, (4, 8, 8), "diffusion", [[1, 2], [1, 2]]),
    "pixart": (pixart, (4, 8, 8), "diffusion", [[2, 4]]),
    "sd3": (sd3, (4, 8, 8), "flow", [[1, 2], [1, 2]]),
    "flux": (flux, (2, 8, 8), "flow", [[1, 2], [2, 4]]),  # 2 channels packed 2x2 = Flux's 8 input features
}


@pytest.mark.parametrize("name", sorted(DENOISERS))
def test_learnable_search_and_baselines_run_on_diffusers_stacks(tmp_path, name):
    from tinyfusion.diffusion import create_objective, sample
    from tinyfusion.models.diffusers_denoiser import DiffusersDenoiser
    from tinyfusion.pruning import baselines
    from tinyfusion.pruning.calibration import CalibrationSet, calibration_loss
    from tinyfusion.pruning.learnable import LearnableSearch, SearchConfig
    from tinyfusion.pruning.masks import kept_from_choices

    build, shape, objective, groups = DENOISERS[name]
    den = DiffusersDenoiser(build(), None if name == "dit" else bank())
    assert den.config.objective == objective
    obj = create_objective(den.config)
    rows = den.config.num_classes
    stack = block_stack(den)
    stack.check_groups(groups)
    calib = CalibrationSet.from_batches(RandomLatents(shape, rows, seed=5), 16)
    full = calibration_loss(den, obj, calib)
    k = sum(n for n, _ in groups)
    for method in (baselines.block_influence, baselines.fluxlite, baselines.sensitivity):
        kept, scores = method(den, obj, calib, k)
        assert len(kept) == k and len(next(iter(scores.values()))) == stack.depth
    search = LearnableSearch(DiffusersDenoiser(build(), None if name == "dit" else bank()), obj,
                             RandomLatents(shape, rows), SearchConfig(groups=groups, steps=3, global_batch_size=8))
    before = [p.detach().clone() for p in search.weights]
    search.run(progress=False)
    assert any(not torch.equal(a, p) for a, p in zip(before, search.weights))  # LoRA on the diffusers blocks trained
    kept = kept_from_choices(groups, search.decision())
    shallow = stack.prune(kept)
    shallow.save_pretrained(tmp_path / "pruned")
    small = DiffusersDenoiser(load_folder(str(tmp_path / "pruned")), None if name == "dit" else bank())
    assert calibration_loss(small, obj, calib) == pytest.approx(calibration_loss(den, obj, calib, kept=kept), rel=1e-4)
    assert full != pytest.approx(calibration_loss(small, obj, calib))
    images = sample(small, torch.tensor([0, 1]), shape, "heun" if objective == "flow" else "ddim", steps=2)
    assert images.shape == (2, *shape) and torch.isfinite(images).all()


@pytest.mark.parametrize("method", ["learnable", "bi"])
def test_prune_cli_on_a_flux_folder_writes_a_loadable_folder(tmp_path, capsys, method):
    import json

    from conftest import run_main, write_latent_folder
    from tinyfusion.prune import main as prune_main

    flux().save_pretrained(tmp_path / "flux")
    torch.save(bank(), tmp_path / "bank.pt")
    write_latent_folder(tmp_path / "lat", 16, (1, 2, 8, 8), 4, name="p")
    out = tmp_path / "run"
    argv = ["--ckpt", str(tmp_path / "flux"), "--cond", str(tmp_path / "bank.pt"), "--data-path", str(tmp_path / "lat"),
            "--method", method, "--steps", "2", "--global-batch-size", "8", "--calib-samples", "8", "--num-workers", "0",
            "--out", str(out)]
    code, _, err = run_main(prune_main, argv, capsys)
    assert code == 0, err
    d = json.loads((out / "decision.json").read_text())
    assert d["groups"] == [[1, 2], [1, 2], [1, 2]] and len(d["kept"]) == 3  # 1:2 on each stack
    loaded = load_folder(str(out / "pruned"))
    assert type(loaded).__name__ == "FluxTransformer2DModel" and block_stack(loaded).depths == [1, 2]
    assert json.loads((out / "pruned" / "tinyfusion.json").read_text())["kept"] == d["kept"]
    if method == "learnable":  # recovery with Masked KD against the source folder, written back as a folder
        from tinyfusion.finetune import main as finetune_main

        code, _, err = run_main(finetune_main, ["--ckpt", str(out / "pruned"), "--cond", str(tmp_path / "bank.pt"),
                                                "--data-path", str(tmp_path / "lat"), "--steps", "2", "--global-batch-size", "8",
                                                "--log-every", "1", "--num-workers", "0"], capsys)
        assert code == 0, err
        m = json.loads((out / "recover-masked" / "metrics.json").read_text())
        assert m["objective"] == "flow" and "hidden_kd" in m["loss_curve"][0] and m["alignment"]
        recovered = load_folder(str(out / "recover-masked" / "recovered"))
        assert block_stack(recovered).depths == [1, 2]
        assert json.loads((out / "recover-masked" / "recovered" / "tinyfusion.json").read_text())["kd"] == "masked"
    code, _, err = run_main(prune_main, [*argv[:4], "--data-path", str(tmp_path / "lat"), "--groups", "[[1,3],[2,3]]",
                                         "--out", str(tmp_path / "bad")], capsys)
    assert code == 2 and "straddles" in err and "Traceback" not in err
    code, _, err = run_main(prune_main, ["--ckpt", str(tmp_path / "flux"), "--data-path", str(tmp_path / "lat"),
                                         "--out", str(tmp_path / "bad2")], capsys)
    assert code == 2 and "conditioning bank" in err
