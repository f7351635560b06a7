"""The one training engine under `train`, the learnable search and `finetune` (see engine.py)."""
from .engine import Engine, RunOptions, Task
from .flags import add_engine_args, engine_config

__all__ = ["Engine", "RunOptions", "Task", "add_engine_args", "engine_config"]
