"""PyTorch adapter: ``from layervault.torch import ModelManager, OptimizerManager``."""

from layervault.torch.managers import ModelManager, OptimizerManager

__all__ = ["ModelManager", "OptimizerManager"]
