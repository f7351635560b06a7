"""Install: `pip install torch==2.13.0` first (CPU build on this machine), then
`pip install --no-build-isolation -e .[dev]`. Every requirement is satisfiable by that torch."""
from setuptools import find_packages, setup
try:
    from torch.utils.cpp_extension import BuildExtension, CppExtension
except ImportError:
    raise SystemExit("tinyfusion builds its C++ ops against an installed torch: `pip install torch` first, "
                     "then `pip install --no-build-isolation -e .`")

# The fused CPU ops (csrc/): -O3 and -fno-trapping-math so the row loops (exp included) vectorize,
# OpenMP so at::parallel_for uses threads; -g0 because debug info of torch's headers costs install time.
cpu_ops = CppExtension(
    "tinyfusion._C",
    ["csrc/fused_ops.cpp"],
    extra_compile_args=["-O3", "-g0", "-fopenmp", "-ffp-contract=fast", "-fno-trapping-math"],
    extra_link_args=["-fopenmp"],
)

setup(
    name="tinyfusion",
    version="0.1.0",
    description="TinyFusion: learnable depth pruning of diffusion transformers, with a deployment stack",
    packages=find_packages(include=["tinyfusion", "tinyfusion.*"]),
    package_data={"tinyfusion.assets": ["*.safetensors", "*.json", "*.md"]},
    ext_modules=[cpu_ops],
    cmdclass={"build_ext": BuildExtension},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "numpy",
        "scipy",
        "scikit-learn",
        "safetensors",
        "tqdm",
        "pillow",
        "matplotlib",
    ],
    extras_require={
        # triton: the kernel tests run in its interpreter on the CPU (Linux wheels only)
        "dev": ["pytest", "diffusers>=0.30", "onnx", "onnxscript", "onnxruntime", "triton; platform_system == 'Linux'"],
        "triton": ["triton"],
        "diffusers": ["diffusers>=0.30"],
        "onnx": ["onnx", "onnxscript", "onnxruntime"],
        "trt": ["onnx", "onnxscript", "onnxruntime", "tensorrt"],
    },
)
