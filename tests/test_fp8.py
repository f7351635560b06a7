"""FP8 block GEMMs (`runtime.load(..., dtype="fp8")`): the quantizer against E4M3 rounding written out in
numpy, the real `torch._scaled_mm` path against the quantize-dequantize reference in fp32, and the whole
forward against the unquantized one at DiT-XL/2 width and on the shipped teacher."""
import numpy as np
import pytest
import torch

from tinyfusion import runtime
from tinyfusion.models import DiT, config_from_name
from tinyfusion.runtime.fp8 import Fp8Gemms, qdq_linear, quantize, rowwise_scaled_mm

from conftest import inputs, randomized


def e4m3_round(v):
    """Round to the nearest E4M3 value (3 mantissa bits, exponent bias 7, subnormals below 2^-6, max 448),
    ties to even, written out from the format's definition."""
    v = np.clip(v.astype(np.float64), -448.0, 448.0)
    e = np.floor(np.log2(np.maximum(np.abs(v), 1e-30)))
    quantum = np.exp2(np.maximum(e, -6.0) - 3.0)  # 8 steps per binade; subnormals share the 2^-9 quantum
    return np.clip(np.round(v / quantum) * quantum, -448.0, 448.0)


def test_quantizer_is_per_row_amax_scaling_and_e4m3_rounding():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 96, generator=g) * torch.logspace(-3, 2, 64)[:, None]  # rows over five decades
    q, scale = quantize(x, -1)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (64, 1)
    torch.testing.assert_close(scale, x.abs().amax(1, keepdim=True) / 448.0)
    want = e4m3_round((x / scale).numpy())
    np.testing.assert_array_equal(q.float().numpy(), want)
    assert (q.float().abs().amax(1) == 448.0).all()  # each row's largest value lands on the format's max


@pytest.mark.parametrize("rowwise", [True, False])
def test_scaled_mm_path_equals_the_quantize_dequantize_reference(rowwise):
    """What _scaled_mm computes (E4M3 operands, both scales, fp32 accumulation, bias) is the fp32 product of
    the rounded operands: only the summation order differs. Both ways: the scales inside _scaled_mm, and unit
    scales with the scales applied after (the way where _scaled_mm takes one scale per operand only, as
    PyTorch 2.11's CPU implementation does)."""
    if rowwise and not rowwise_scaled_mm("cpu", torch.float32):
        pytest.skip(f"PyTorch {torch.__version__}'s CPU _scaled_mm takes one scale per operand only")
    g = torch.Generator().manual_seed(1)
    layer = torch.nn.Linear(128, 384)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(384, 128, generator=g) / 128 ** 0.5)
    x = torch.randn(32, 128, generator=g)

    class Model(torch.nn.Module):  # the shape Fp8Gemms reads: blocks with attn.qkv/proj and mlp.fc1/fc2
        def __init__(self):
            super().__init__()
            block = torch.nn.Module()
            block.attn, block.mlp = torch.nn.Module(), torch.nn.Module()
            block.attn.qkv = layer
            block.attn.proj = block.mlp.fc1 = block.mlp.fc2 = torch.nn.Linear(2, 2)
            self.blocks = torch.nn.ModuleList([block])

    gemms = Fp8Gemms(Model(), ops=None)
    gemms.rowwise = rowwise
    out = gemms.linear(x, layer)
    torch.testing.assert_close(out, qdq_linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)


def cosine(a, b):
    return torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0).item()


def test_one_fp8_gemm_on_gaussian_data_is_at_e4m3s_precision():
    """E4M3 keeps 3 mantissa bits: with per-row and per-channel scales one GEMM on Gaussian data carries about
    3.7% relative error (cosine 0.9993), whatever the width. This is the floor every forward below builds on."""
    g = torch.Generator().manual_seed(0)
    for k in (128, 1152):
        x, w = torch.randn(64, k, generator=g), torch.randn(512, k, generator=g) / k ** 0.5
        ref, got = x @ w.t(), qdq_linear(x, w)
        assert 0.03 < ((got - ref).norm() / ref.norm()).item() < 0.045 and cosine(got, ref) > 0.999


def test_fp8_forward_of_the_trained_teacher_meets_the_accuracy_goal():
    """The issue's goal, cosine >= 0.999 per forward against the unquantized model, on the one trained DiT we
    have (measured 0.99992 over 64 inputs)."""
    import tinyfusion
    from tinyfusion.assets import TEACHER_PATH

    model = tinyfusion.load(TEACHER_PATH)
    x, t, y = inputs(model.config, n=64)
    with torch.no_grad():
        ref = runtime.load(model, "cpp")(x, t, y)
        fp8 = runtime.load(model, "cpp", dtype="fp8")
        out = fp8(x, t, y)
    assert fp8.backend == "cpp+fp8" and not torch.equal(out, ref)  # the GEMMs really ran in FP8
    assert cosine(out, ref) >= 0.999, cosine(out, ref)


def test_fp8_forward_at_xl_width_on_random_weights():
    """Four DiT-XL/2 blocks (hidden 1152, MLP 4608) with random weights whose every block matters: each block's
    four FP8 GEMMs compound the per-GEMM floor above, cosine 0.99835 (0.99839 at all 28 blocks). Random
    weights are the hard case: the trained teacher's forward stays at 0.99992."""
    torch.manual_seed(0)
    model = randomized(DiT(config_from_name("DiT-XL/2", input_size=8, depth=4)))
    x, t, y = inputs(model.config, n=2)
    with torch.no_grad():
        ref = runtime.load(model, "cpp")(x, t, y)
        out = runtime.load(model, "cpp", dtype="fp8")(x, t, y)
    assert cosine(out, ref) >= 0.998, cosine(out, ref)
    assert ((out - ref).abs().max() / ref.abs().max()).item() < 0.1  # no element far off (a wrong scale would be)


def test_shipped_teacher_under_fp8_samples_like_fp32():
    """The digits teacher's guided DDIM samples with FP8 block GEMMs against fp32 (the FID of 1000 samples
    is in docs/runtime.md; here the per-forward and per-sample agreement)."""
    import tinyfusion
    from tinyfusion.assets import TEACHER_PATH
    from tinyfusion.diffusion import sample

    model = tinyfusion.load(TEACHER_PATH)
    labels = torch.arange(20) % 10
    with torch.no_grad():
        a = sample(runtime.load(model, "cpp"), labels, (1, 8, 8), "ddim", 10, cfg_scale=1.5, seed=3)
        b = sample(runtime.load(model, "cpp", dtype="fp8"), labels, (1, 8, 8), "ddim", 10, cfg_scale=1.5, seed=3)
    assert cosine(a, b) >= 0.99, cosine(a, b)


def test_fp8_is_refused_where_it_does_not_run(monkeypatch):
    """A backend without the fused forward, and a GPU without FP8 tensor cores (an A100 reports compute
    capability 8.0; the device query is replaced, the check is ours) are refused in one line."""
    from tinyfusion.errors import UserError
    from tinyfusion.runtime.fp8 import check_device

    model = randomized(DiT(config_from_name("DiT-S/2", input_size=8, depth=1)))
    with pytest.raises(UserError, match="triton .CUDA. or cpp .CPU. backend"):
        runtime.load(model, "eager", dtype="fp8")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    with pytest.raises(UserError, match=r"^FP8 needs a GPU of CUDA compute capability 8.9 or later .*A100-SXM4-80GB is 8.0$"):
        check_device("cuda")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    check_device("cuda")  # Hopper
    check_device("cpu")
