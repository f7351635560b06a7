"""Install: `pip install torch==2.13.0` first (CPU build on this machine), then
`pip install --no-build-isolation -e .[dev]`. Every requirement is satisfiable by that torch."""
from setuptools import find_packages, setup

setup(
    name="tinyfusion",
    version="0.1.0",
    description="TinyFusion: learnable depth pruning of diffusion transformers, with a deployment stack",
    packages=find_packages(include=["tinyfusion", "tinyfusion.*"]),
    package_data={"tinyfusion.assets": ["*.safetensors", "*.json", "*.md"]},
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
        "dev": ["pytest", "diffusers>=0.30"],
        "diffusers": ["diffusers>=0.30"],
    },
)
