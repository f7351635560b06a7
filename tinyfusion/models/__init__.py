from .dit import DiT, DiTBlock, DiTConfig, config_from_name

__all__ = ["DiT", "DiTBlock", "DiTConfig", "config_from_name"]
