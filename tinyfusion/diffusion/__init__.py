from .flow import FlowObjective, create_objective
from .gaussian import GaussianDiffusion, create_diffusion, linear_betas, space_timesteps
from .sampling import DEFAULT_STEPS, sample, samplers_for

__all__ = ["GaussianDiffusion", "FlowObjective", "create_diffusion", "create_objective", "linear_betas",
           "space_timesteps", "sample", "samplers_for", "DEFAULT_STEPS"]
