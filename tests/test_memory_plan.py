"""The memory model (`python -m tinyfusion.plan`) against the real sizes of a small model: its parameters,
gradients and AdamW state after a real step, plain and sharded by FSDP2 itself over 2 ranks (a fake process
group: the shapes FSDP gives each rank are real, no data moves); the LoRA count against the real update."""
import copy

import pytest
import torch
import torch.distributed as dist

from tinyfusion.plan import main as plan_main
from tinyfusion.training.memory import estimate

from conftest import assert_one_line_error, run_main, tiny_dit


def small():
    # 7 classes: an embedding table of 8 rows; hidden 32 with 3 heads' worth of odd shapes elsewhere
    return tiny_dit(in_channels=1, num_classes=7, depth=3, hidden_size=32, num_heads=2).train()


def step(model):
    """What a real step holds: every fp32 parameter (frozen ones too), the gradients of the trainable ones
    and AdamW's two moments of them (this rank's shards)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()
    local = lambda t: t.to_local() if hasattr(t, "to_local") else t  # noqa: E731
    size = lambda ts: sum(local(t).numel() * local(t).element_size() for t in ts)  # noqa: E731
    moments = [s[k] for s in opt.state.values() for k in ("exp_avg", "exp_avg_sq")]
    return size(model.parameters()), size(p.grad for p in params), size(moments)


def test_ddp_terms_are_the_real_sizes_after_an_adamw_step():
    model = small()
    est = estimate(model, "train", world=4, precision="fp32")["ddp"]
    assert (est["parameters"], est["gradients"], est["optimizer"]) == step(model)
    assert est["ema"] == est["parameters"] and est["working set"] == 0  # the EMA module holds every parameter; fp32: no autocast copies


def test_fsdp_terms_are_the_shards_fsdp_gives_a_rank():
    """FSDP2 pads dim 0 to a multiple of the ranks and splits it: rank 0 holds the ceiling of each tensor."""
    from torch.distributed.fsdp import fully_shard
    from torch.testing._internal.distributed.fake_pg import FakeStore

    model = small()
    est = estimate(copy.deepcopy(model), "train", world=2, precision="fp32")["fsdp"]
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    try:
        for b in model.blocks:
            fully_shard(b)
        fully_shard(model)
        assert (est["parameters"], est["gradients"], est["optimizer"]) == step(model)
    finally:
        dist.destroy_process_group()


def test_search_and_finetune_terms():
    """The search trains LoRA (rank r: A and B of every block Linear) over frozen weights; finetune trains a
    student of half the blocks against the whole model as teacher."""
    from tinyfusion.pruning.lora import apply_lora
    from tinyfusion.models.stack import block_stack

    model = small()
    lora = copy.deepcopy(model).requires_grad_(False)
    real = sum(p.numel() for m in block_stack(lora).lora_targets() for p in apply_lora(m, 4, 8.0))
    est = estimate(model, "search", world=1, lora_rank=4, precision="fp32")["ddp"]
    assert est["gradients"] == 4 * real and est["optimizer"] == 8 * real
    assert est["parameters"] == 4 * sum(p.numel() for p in model.parameters())
    ft = estimate(model, "finetune", world=1, keep=2 / 3, precision="fp32")["ddp"]
    student = model.blocks[0]
    whole = sum(p.numel() for p in model.parameters())
    assert ft["teacher"] == 4 * whole
    assert ft["parameters"] == 4 * (whole - sum(p.numel() for p in student.parameters()))


def test_the_presets_and_their_verdicts(capsys):
    """Flux.1-dev (11.9B, built on the meta device from its published config) cannot Masked-KD a half-depth
    student under DDP on 80 GiB; FSDP over 8 ranks can."""
    pytest.importorskip("diffusers")
    code, out, err = run_main(plan_main, ["--model", "flux-dev", "--gpus", "8", "--gpu-memory", "80", "--batch", "4"], capsys)
    assert code == 0, err
    verdict = out.strip().splitlines()[-1]
    assert "11.901B parameters" in out and verdict.split("does not fit")[1].strip() == "fits", out  # DDP, FSDP
    code, out, _ = run_main(plan_main, ["--model", "DiT-XL/2", "--task", "train"], capsys)
    assert code == 0 and "0.675B parameters" in out


@pytest.mark.parametrize("argv,fragment", [
    (["--model", "DiT-XL/2", "--keep", "2"], "--keep is a fraction"),
    (["--model", "DiT-Q/2"], "unknown model name"),
    (["--ckpt", "/nonexistent"], "no such file"),
])
def test_plan_bad_input(capsys, argv, fragment):
    code, _, err = run_main(plan_main, argv, capsys)
    assert_one_line_error(code, err, fragment)
