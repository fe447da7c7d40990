"""TensorFlow / Keras 3 adapter: ``from layervault.tensorflow import ModelManager, OptimizerManager``.

Importing it imports TensorFlow; ``import layervault`` and ``layervault.torch`` never do.
"""

try:
    import tensorflow  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the installation
    raise ImportError(
        "layervault.tensorflow needs TensorFlow: pip install 'layervault[tensorflow]'") from exc

from layervault.tensorflow.callback import CheckpointCallback
from layervault.tensorflow.managers import ModelManager, OptimizerManager

__all__ = ["ModelManager", "OptimizerManager", "CheckpointCallback"]
