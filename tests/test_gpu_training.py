"""GPU-only: the training engine and the pruning baselines on CUDA (what the CPU suite cannot see): bf16
by default, resume from a state saved on the GPU (RNG states mapped to the CPU), the score baselines'
accumulators, MAR sampling with a CPU generator, and an NCCL process group of one. Skipped without
CUDA; bench/gpu_check.sh runs it."""
import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs an NVIDIA GPU (run by bench/gpu_check.sh)", allow_module_level=True)

from test_training import assert_same_weights, ema_of  # noqa: E402

import tinyfusion  # noqa: E402
from tinyfusion.training import RunOptions  # noqa: E402


def test_cuda_defaults_to_bf16():
    from tinyfusion.training import precision

    assert precision.resolve("auto", "cuda") == "bf16"


def cuda_recovery(steps=8, world=1, **opts):
    from tinyfusion.data.batches import DigitsBatches
    from tinyfusion.diffusion.gaussian import create_diffusion
    from tinyfusion.recovery.finetune import FinetuneConfig, Recovery
    from tinyfusion.recovery.kd import alignment
    from test_training import digits_dit

    c = FinetuneConfig(steps=steps, global_batch_size=16, log_every=2, ckpt_every=2)
    return Recovery(digits_dit(2, seed=1), digits_dit(4), alignment([[1, 2], [1, 2]], [1, 3]), create_diffusion(""),
                    DigitsBatches(16, 0, 0, world), c, world=world, device="cuda", options=RunOptions(async_save=False, **opts))


@pytest.mark.parametrize("precision", ["bf16", "fp16", "fp32"])
def test_resume_on_cuda_is_bit_identical(tmp_path, precision):
    path = str(tmp_path / "state.pt")
    ref = cuda_recovery(precision=precision)
    ref.engine.run()
    cut = cuda_recovery(precision=precision)

    def kill(step):
        if step == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cut.engine.run(path, kill)
    resumed = cuda_recovery(precision=precision)
    resumed.resume(path)
    resumed.engine.run()
    assert resumed.engine.precision == precision and ref.engine.fused
    assert_same_weights(ema_of(ref), ema_of(resumed))


@pytest.mark.parametrize("grad_accum,grad_checkpoint", [(2, False), (1, True)])
def test_accumulation_and_checkpointing_on_cuda(grad_accum, grad_checkpoint):
    plain = cuda_recovery(precision="fp32", tf32=False)
    other = cuda_recovery(precision="fp32", tf32=False, grad_accum=grad_accum, grad_checkpoint=grad_checkpoint)
    plain.engine.run()
    other.engine.run()
    assert_same_weights(ema_of(plain), ema_of(other), atol=1e-5)


def test_score_baselines_on_cuda():
    from tinyfusion.assets import TEACHER_PATH
    from tinyfusion.data.batches import DigitsBatches
    from tinyfusion.diffusion.gaussian import create_diffusion
    from tinyfusion.pruning import baselines
    from tinyfusion.pruning.calibration import CalibrationSet

    model = tinyfusion.load(TEACHER_PATH)
    calib = CalibrationSet.from_batches(DigitsBatches(64, 0), 64)
    d = create_diffusion("")
    on_cpu = [baselines.block_influence(model, d, calib, 6), baselines.fluxlite(model, d, calib, 6)]
    model = model.cuda()
    on_gpu = [baselines.block_influence(model, d, calib, 6), baselines.fluxlite(model, d, calib, 6)]
    for (k_cpu, s_cpu), (k_gpu, s_gpu) in zip(on_cpu, on_gpu):
        assert k_cpu == k_gpu
        for key in s_cpu:
            assert s_gpu[key] == pytest.approx(s_cpu[key], rel=1e-3, abs=1e-5)


def test_mar_samples_on_cuda_like_on_the_cpu():
    """A CPU generator drives the sampling noise on either device: the same seed gives the same images."""
    from tinyfusion.assets import MAR_TEACHER_PATH

    model = tinyfusion.load(MAR_TEACHER_PATH).eval()
    labels = torch.arange(4)
    cpu = model.sample(labels, num_iter=4, head_steps=10, seed=3)
    gpu = model.cuda().sample(labels.cuda(), num_iter=4, head_steps=10, seed=3)
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-3, atol=1e-3)


def device_batches(n=16):
    """One digits batch on the GPU, every step: the step is what is checked, not the loader."""
    from tinyfusion.data.batches import DigitsBatches, FixedBatches

    x, y = DigitsBatches(n, 0).next()
    return FixedBatches(x.cuda(), y.cuda())


@pytest.mark.parametrize("kind", ["search", "masked_kd"])
@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_a_training_step_never_waits_for_the_host(kind, precision):
    """Between log points the step makes no synchronizing CUDA call (CUDA's sync debug mode raises on one)."""
    from tinyfusion.diffusion.gaussian import create_diffusion
    from tinyfusion.pruning.learnable import LearnableSearch, SearchConfig
    from tinyfusion.recovery.finetune import FinetuneConfig, Recovery
    from tinyfusion.recovery.kd import alignment
    from test_training import digits_dit

    opts = RunOptions(precision=precision, async_save=False)
    if kind == "search":
        cfg = SearchConfig(groups=[[1, 2], [1, 2]], steps=10, global_batch_size=16, log_every=100)
        task = LearnableSearch(digits_dit(4), create_diffusion(""), device_batches(), cfg, device="cuda", options=opts)
    else:
        cfg = FinetuneConfig(steps=10, global_batch_size=16, log_every=100)
        task = Recovery(digits_dit(2, seed=1), digits_dit(4), alignment([[1, 2], [1, 2]], [1, 3]), create_diffusion(""),
                        device_batches(), cfg, device="cuda", options=opts)
    task.engine.train_step()  # first step: lazy allocations, the optimizer state
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            task.engine.train_step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert task.engine.step == 4


def test_engine_collectives_run_on_an_nccl_group(tmp_path):
    """NCCL reduces only CUDA tensors: the engine's skip flag and logged losses must be device tensors. A
    one-rank NCCL group with the engine told world=2 (so DDP and every collective run) completes steps and
    log points; the pre-engine loops all-reduced a CPU flag and crashed at step 1."""
    import torch.distributed as dist

    dist.init_process_group("nccl", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        task = cuda_recovery(steps=4, world=2)
        task.engine.run()
        assert [e["step"] for e in task.curve] == [2, 4] and task.engine.skipped_steps == 0
    finally:
        dist.destroy_process_group()
