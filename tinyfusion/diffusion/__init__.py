from .gaussian import GaussianDiffusion, create_diffusion, linear_betas, space_timesteps
from .sampling import DEFAULT_STEPS, sample

__all__ = ["GaussianDiffusion", "create_diffusion", "linear_betas", "space_timesteps", "sample", "DEFAULT_STEPS"]
