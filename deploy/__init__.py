"""deploy: shrink a trained PyTorch model for a device and keep the accuracy-latency frontier."""

from deploy.errors import DeployError
from deploy.pick import pick
from deploy.pipeline import OptimizeConfig, optimize

__version__ = "0.1.0"

__all__ = ["DeployError", "OptimizeConfig", "optimize", "pick"]
