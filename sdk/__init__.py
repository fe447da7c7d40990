"""layervault: layer-wise checkpoints for distributed training, through node agents.

Framework adapters live in ``layervault.torch`` (and ``layervault.tensorflow``); this
package keeps only framework-free names so that importing it never imports torch.
"""

from layervault.config import ModelConfig, OptimizerConfig, Retention
from layervault.errors import (
    AlreadyExistsError,
    ChecksumError,
    IncompatibleStateError,
    InvalidArgumentError,
    LayervaultError,
    NotFoundError,
    SaveFailedError,
    StagedWhileChangingError,
)

__all__ = [
    "ModelConfig",
    "OptimizerConfig",
    "Retention",
    "AgentClient",
    "LayervaultError",
    "NotFoundError",
    "AlreadyExistsError",
    "ChecksumError",
    "IncompatibleStateError",
    "InvalidArgumentError",
    "SaveFailedError",
    "StagedWhileChangingError",
]

__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    if name == "AgentClient":  # grpc stubs load on first use, not on import
        from layervault.client import AgentClient

        return AgentClient
    raise AttributeError(name)
