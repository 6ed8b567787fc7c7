"""Which Keras the callbacks build on: Keras 3, or tf-keras when ``TF_USE_LEGACY_KERAS`` is set.

TensorFlow's own rule (``tensorflow/python/util/lazy_loader.py``): with
``TF_USE_LEGACY_KERAS`` set to ``1``, ``true`` or ``True``, ``tf.keras`` is
tf-keras (Keras 2), and models built with it need callbacks of tf-keras. So
``cloudckpt.keras`` follows the same variable: its callbacks then subclass
``tf_keras.callbacks`` (needed for ``model.fit`` under
``MultiWorkerMirroredStrategy``, which Keras 3 does not support:
keras-team/keras#20585). The few calls that differ between the two are here.
"""

from __future__ import annotations

import os
from typing import Any

LEGACY = os.environ.get("TF_USE_LEGACY_KERAS") in ("1", "true", "True")  # TF's test of the variable

if LEGACY:
    try:
        import tf_keras as keras
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("TF_USE_LEGACY_KERAS is set, so cloudckpt.keras builds on tf-keras, which is not "
                          "installed: pip install tf-keras (the version matching TensorFlow's).") from exc
else:
    try:
        import keras
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("cloudckpt.keras needs Keras 3: pip install 'keras>=3'") from exc
    if int(keras.__version__.split(".", 1)[0]) < 3:  # pragma: no cover - depends on the environment
        raise ImportError(f"cloudckpt.keras needs Keras 3, found Keras {keras.__version__}: pip install 'keras>=3' "
                          "(or set TF_USE_LEGACY_KERAS=1 for tf-keras)")

__all__ = ["LEGACY", "keras", "optimizer_built", "set_initial_epoch", "to_int"]


def to_int(value: Any) -> int:
    """A scalar variable or tensor (``optimizer.iterations``) as an int."""
    if LEGACY:
        return int(keras.backend.get_value(value))
    return int(keras.ops.convert_to_numpy(value))


def optimizer_built(optimizer: Any) -> bool:
    """True once the optimizer's variables exist (Keras 3: ``built``; tf-keras: ``_built``)."""
    return bool(getattr(optimizer, "built", getattr(optimizer, "_built", False)))


class _ResumeAt:
    """What tf-keras' ``fit`` asks for the epoch to start at (its ``model._training_state`` protocol, set by
    tf-keras' own ``BackupAndRestore``): the restored epoch, from its first batch."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def maybe_load_initial_counters_from_ckpt(self, steps_per_epoch: Any, initial_epoch: int, mode: Any = None
                                              ) -> tuple[int, int]:
        return self.epoch, 0


def set_initial_epoch(model: Any, epoch: int | None) -> None:
    """Make ``fit`` start at ``epoch`` (None: at fit's own ``initial_epoch``), as Keras' own
    ``BackupAndRestore`` does: Keras 3 reads ``model._initial_epoch``, tf-keras ``model._training_state``."""
    if LEGACY:
        model._training_state = None if epoch is None else _ResumeAt(epoch)
    else:
        model._initial_epoch = epoch
