"""tinyfusion: learnable depth pruning of diffusion transformers (TinyFusion) and the stack to deploy them."""
from .checkpoint import load, save
from .models import DiT, DiTConfig, config_from_name

__version__ = "0.1.0"
__all__ = ["load", "save", "DiT", "DiTConfig", "config_from_name"]
