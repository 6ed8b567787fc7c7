"""A tiny Keras 3 model and probe callbacks for the Keras callback tests (public Keras API only)."""

from __future__ import annotations

from dataclasses import dataclass

import keras
import numpy as np

BATCH_SIZE = 16
SAMPLES = 64  # 4 batches per epoch


def data(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Inputs (SAMPLES x 4) and targets of a smooth regression problem."""
    x = np.random.RandomState(seed).rand(SAMPLES, 4).astype("float32")
    return x, (x @ np.array([[1.0], [-2.0], [0.5], [3.0]], dtype="float32")).astype("float32")


def make_model(seed: int = 0, learning_rate: float = 0.01) -> keras.Model:
    """A compiled two-layer MLP with Adam; ``seed`` sets the initial weights (different seeds differ).
    Eager: for a few batches that is cheaper than tracing a graph, and the callbacks see the same thing."""
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="relu"), keras.layers.Dense(1)])
    model.compile(keras.optimizers.Adam(learning_rate), loss="mse", run_eagerly=True)
    return model


@dataclass
class State:
    """Model weights, optimizer variables and ``optimizer.iterations`` at one moment."""

    iterations: int
    weights: list[np.ndarray]
    optimizer: list[np.ndarray]

    @classmethod
    def of(cls, model: keras.Model) -> "State":
        return cls(int(model.optimizer.iterations), [np.array(w) for w in model.get_weights()],
                   [np.array(v) for v in model.optimizer.variables])

    def assert_equal(self, other: "State") -> None:
        assert self.iterations == other.iterations, (self.iterations, other.iterations)
        assert len(self.weights) == len(other.weights) and len(self.optimizer) == len(other.optimizer)
        for a, b in zip(self.weights, other.weights):
            np.testing.assert_array_equal(a, b)
        for a, b in zip(self.optimizer, other.optimizer):
            np.testing.assert_array_equal(a, b)

    def save(self, path: str) -> None:
        np.savez(path, iterations=self.iterations, **{f"w{i}": w for i, w in enumerate(self.weights)},
                 **{f"o{i}": v for i, v in enumerate(self.optimizer)})

    @classmethod
    def load(cls, path: str) -> "State":
        with np.load(path) as f:
            w = [f[f"w{i}"] for i in range(sum(k.startswith("w") for k in f.files))]
            o = [f[f"o{i}"] for i in range(sum(k.startswith("o") for k in f.files))]
            return cls(int(f["iterations"]), w, o)


class Probe(keras.callbacks.Callback):
    """Records the state when training begins (after callbacks listed before it restored) and at every
    epoch end, and the epochs that ran."""

    def __init__(self) -> None:
        super().__init__()
        self.begin: State | None = None
        self.epochs: list[int] = []
        self.at_epoch_end: dict[int, State] = {}

    def on_train_begin(self, logs=None):
        self.begin = State.of(self.model)

    def on_epoch_begin(self, epoch, logs=None):
        self.epochs.append(epoch)

    def on_epoch_end(self, epoch, logs=None):
        self.at_epoch_end[epoch] = State.of(self.model)


class RaiseAtEpoch(keras.callbacks.Callback):
    """Interrupts ``fit`` when epoch ``epoch`` (0-based) begins, as a crash would."""

    def __init__(self, epoch: int) -> None:
        super().__init__()
        self.epoch = epoch

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == self.epoch:
            raise RuntimeError(f"interrupted at epoch {epoch}")
