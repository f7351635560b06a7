"""bench/kernels.py's cases on the CPU, in Triton's interpreter (the benchmark itself needs CUDA): every call
the GPU run times runs here, and the "-> E4M3" rows, which time a fused kernel against the plain kernel
followed by a quantizer, compute the same E4M3 bytes either way (else the comparison would time different
work)."""
import sys

import pytest
import torch

pytest.importorskip("triton")
from tinyfusion.kernels import INTERPRET  # noqa: E402

from conftest import ROOT  # noqa: E402

sys.path.insert(0, f"{ROOT}/bench")
import kernels  # noqa: E402

if not INTERPRET:
    pytest.skip("TRITON_INTERPRET is not 1 (the GPU runs bench/kernels.py itself)", allow_module_level=True)


def fresh_cases():
    torch.manual_seed(0)  # the same inputs on every call: some timed calls update theirs in place
    return kernels.cases(1, torch.float32, device="cpu", tokens=3)


@pytest.mark.usefixtures("interpreter_loops")  # the attention case loops to a runtime bound
def test_every_timed_call_runs_and_fused_quantization_rows_agree_with_their_unfused_pairs():
    for name, (size, impls) in fresh_cases().items():
        assert "triton" in impls and size != 0, name  # the bandwidth column reads the triton row
        # each call on fresh inputs; "compile" (Inductor) is left to the GPU run
        results = {impl: fresh_cases()[name][1][impl]() for impl in impls if impl != "compile"}
        if "E4M3" in name:
            quantized = {impl: r[-1] if isinstance(r[-1], tuple) else r for impl, r in results.items()}
            q, s = quantized.pop("triton")
            assert q.dtype == torch.float8_e4m3fn and quantized, name
            for q_other, s_other in quantized.values():
                assert torch.equal(s, s_other) and torch.equal(q.float(), q_other.float()), name
