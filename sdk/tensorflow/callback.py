"""A Keras callback that checkpoints through the managers every N steps and/or epochs."""

from __future__ import annotations

from typing import Any

import keras

from layervault.client import SaveHandle
from layervault.errors import InvalidArgumentError
from layervault.tensorflow.managers import ModelManager, OptimizerManager


def _every(name: str, value: int | None) -> int | None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise InvalidArgumentError(f"{name} must be a positive int or None, got {value!r}")
    return value


class CheckpointCallback(keras.callbacks.Callback):
    """Save the model (and its optimizer) during ``model.fit``.

    The step is the optimizer's ``iterations`` (the global step); every save also carries
    the training key ``epoch``: the number of epochs completed at that moment, so
    ``mm.load(model, epoch=E)`` followed by ``model.fit(..., initial_epoch=E)`` resumes.
    A save returns as soon as the bytes are staged; the callback waits for its commit
    before the next save and at the end of training, so a failed save stops training
    with its error instead of passing unnoticed. A step already saved is not saved again.
    """

    def __init__(self, model_manager: ModelManager | None = None, optimizer_manager: OptimizerManager | None = None,
                 every_n_steps: int | None = None, every_n_epochs: int | None = 1) -> None:
        super().__init__()
        if model_manager is None and optimizer_manager is None:
            raise InvalidArgumentError("CheckpointCallback needs a ModelManager, an OptimizerManager or both")
        self.model_manager, self.optimizer_manager = model_manager, optimizer_manager
        self.every_n_steps = _every("every_n_steps", every_n_steps)
        self.every_n_epochs = _every("every_n_epochs", every_n_epochs)
        if every_n_steps is None and every_n_epochs is None:
            raise InvalidArgumentError("set every_n_steps, every_n_epochs or both")
        self._epochs_done = 0
        self._last_step: int | None = None
        self._pending: list[SaveHandle] = []

    def _step(self) -> int:
        return int(self.model.optimizer.iterations.numpy())

    def save(self, **keys: Any) -> None:
        """Save now (at the optimizer's current step) with these training keys."""
        step = self._step()
        if step == self._last_step:
            return
        self.wait()
        if self.model_manager is not None:
            self._pending.append(self.model_manager.save(self.model, step=step, **keys))
        if self.optimizer_manager is not None:
            self._pending.append(self.optimizer_manager.save(self.model.optimizer, step=step, **keys))
        self._last_step = step

    def wait(self) -> None:
        """Block until every save so far is committed (raises its error if one failed)."""
        pending, self._pending = self._pending, []
        for handle in pending:
            handle.wait()

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._epochs_done = epoch

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        if not self.every_n_steps or self._step() % self.every_n_steps:
            return
        steps = (self.params or {}).get("steps")
        epoch_save_follows = (self.every_n_epochs and steps and batch + 1 == steps
                              and (self._epochs_done + 1) % self.every_n_epochs == 0)
        if not epoch_save_follows:  # else on_epoch_end saves this step, with the finished epoch counted
            self.save(epoch=self._epochs_done)

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if self.every_n_epochs and (epoch + 1) % self.every_n_epochs == 0:
            self.save(epoch=epoch + 1)

    def on_train_end(self, logs: dict | None = None) -> None:
        self.wait()
