"""What both Keras callbacks do with their ``CheckpointEngine`` around ``model.fit``.

Keras tells callbacks when training begins and ends normally, never that
``fit`` raised. So a callback that is not closed by ``on_train_end`` is
closed by ``close()`` (also ``with callback:``) or, at the latest, at
interpreter exit (``shutdown.call_at_exit``): the backups still uploading then get up to
``upload_timeout`` seconds to commit, the preemption watcher's SIGTERM
handler is removed and no cloudckpt thread is left. Ctrl-C is not waited
for: a ``with callback:`` block left by ``KeyboardInterrupt``, an exit
after one (``shutdown.interrupted_exit``), or Ctrl-C while ``on_train_end``,
``close()`` or the exit waits abandons the backups still uploading (none is
committed; the previous committed one stays the latest), and a request the
store stalls is not waited for beyond ``uploader.ABANDON_GRACE``.
"""

from __future__ import annotations

import logging
import weakref
from typing import Any

from ..engine import CheckpointEngine
from ..errors import ConfigError, integer_option
from ..shutdown import call_at_exit, interrupted_exit
from ..uploader import UploadStats
from ._backend import to_int

log = logging.getLogger("cloudckpt")


def iterations(model: Any) -> int:
    """``model.optimizer.iterations`` as an int (any backend).

    Raises:
        ConfigError: the model has no optimizer (it was not compiled).
    """
    optimizer = getattr(model, "optimizer", None)
    if optimizer is None:
        raise ConfigError("The model has no optimizer: compile it before fit() so that its training state "
                          "(optimizer.iterations) can be saved.")
    return to_int(optimizer.iterations)


def check_positive_int_or_epoch(name: str, value: Any) -> str | int:
    """``save_freq``-style arguments: ``"epoch"`` or an int >= 1 (a numpy integer too); returns ``"epoch"``
    or the plain ``int``.

    Raises:
        ConfigError: anything else (a ``ValueError``, as Keras raises).
    """
    if isinstance(value, str) and value == "epoch":
        return value
    number = integer_option(value)
    if number is None or number < 1:
        raise ConfigError(f"{name} must be 'epoch' or an integer >= 1 (batches), got {value!r}.")
    return number


class EngineLifecycle:
    """Mixin: owns ``self._engine`` and closes it once, whatever way ``fit`` ends."""

    _engine: CheckpointEngine

    def _init_lifecycle(self, engine: CheckpointEngine) -> None:
        self._engine = engine
        self._running = False  # between on_train_begin and on_train_end / close()
        # _abandon() ran since on_train_begin (Ctrl-C): it said what it gave up and closed the engine at once, so
        # _close_at_exit does not do it again. Not the Uploader's _worker_abandoned (its worker's transfers were
        # cancelled, set on a timeout too and cleared by a restart): this is the callback's own close-down.
        self._abandon_ran = False
        # optimizer.iterations as training goes, for the commit lag in steps: read at each epoch's beginning,
        # then that plus the batches fit reports (_count_steps_from, _count_batch); None when not known.
        self._steps_at_epoch_begin: int | None = None
        self._steps_now: int | None = None
        engine.step_source = self._training_step
        call_at_exit(_close_at_exit, weakref.ref(self))

    # -- public ------------------------------------------------------------------------------------------
    @property
    def local_dir(self) -> str:
        """The local directory files are written to (and backups downloaded to) before they are committed."""
        return self._engine.local_dir

    @property
    def writer_id(self) -> str:
        """This callback's writer id in the directory's commit log (``cloudckpt ls --json``, ``FencedError``)."""
        return self._engine.writer_id

    def wait(self, timeout: float | None = None) -> None:
        """Block until every file saved so far is committed (or dropped).

        Args:
            timeout: seconds to wait at most; None waits until done.

        Raises:
            UploadError: a save failed to commit (``FencedError`` if a newer writer took over the
                directory), or ``timeout`` passed first.
        """
        self._engine.wait(timeout)

    def stats(self) -> UploadStats:
        """Commit counters: each save's outcome (committed, of which replaced; healed, already_committed,
        refused), dropped, failed, housekeeping failures, bytes uploaded, retries by cause, the last committed
        step.

        A save's step is ``optimizer.iterations`` (batches), so the commit lag in steps of the newest committed
        save (``last_commit_lag_steps``) is the training batches run between that save and its commit:
        ``optimizer.iterations`` at the epoch's beginning plus the batches ``fit`` reported since (its
        ``on_train_batch_end``), minus the save's step -- exact, except that with ``steps_per_execution`` > 1
        the last execution of an epoch, when shorter, counts as a whole one. Nothing is read from the
        model per batch."""
        return self._engine.stats()

    def close(self) -> None:
        """Stop the background uploads and the preemption watcher; idempotent.

        Saves still uploading get up to ``upload_timeout`` seconds (None: until done) to commit; then
        they are abandoned (the previous committed save stays the latest). Runs from ``on_train_end``;
        call it (or use ``with callback:``) when ``fit`` raised, else it runs at interpreter exit.
        Failures not yet reported are logged at ERROR, not raised.
        """
        self._running = False
        try:
            self._engine.close()
        except KeyboardInterrupt:  # Ctrl-C while waiting for the uploads: abandon them, as `with` does
            self._abandon("KeyboardInterrupt while waiting for the uploads to commit")
            raise

    def _count_steps_from(self, model: Any) -> None:
        """At an epoch's beginning: ``optimizer.iterations`` now (one read per epoch), the training step the
        batches of the epoch count from, for the commit lag in steps."""
        try:
            self._steps_at_epoch_begin = iterations(model)
        except Exception as exc:  # noqa: BLE001 - a statistic never fails training
            log.debug("optimizer.iterations could not be read (%s); the commit lag in steps counts saves.", exc)
            self._steps_at_epoch_begin = None
        self._steps_now = self._steps_at_epoch_begin

    def _count_batch(self, batch: int) -> None:
        """After batch ``batch`` of the epoch (Keras' index, of the last batch of a ``steps_per_execution``):
        the training step now, stored for the uploader thread (an addition; nothing is read from the model)."""
        base = self._steps_at_epoch_begin
        if base is not None:
            self._steps_now = base + batch + 1

    def _training_step(self) -> int | None:
        """``CheckpointEngine.step_source``, in the uploader thread: ``optimizer.iterations`` as of the last
        batch ``fit`` reported (None: not known)."""
        return self._steps_now

    def _open(self, *, writes_local_dir: bool = True) -> None:
        """When training begins: a callback still open from a ``fit`` that raised is closed first (its
        backups get ``upload_timeout`` to commit), then the store is checked and the engine opened
        (``writes_local_dir``: see ``CheckpointEngine.open``).

        Raises:
            ConfigError / RemoteError: the store cannot be used; another process writes ``local_dir``, or
                it holds another URL's checkpoints.
        """
        if self._running:
            log.info("A previous fit() with this callback did not end normally; closing it first.")
            self.close()
        self._engine.open(writes_local_dir=writes_local_dir)
        self._abandon_ran = False
        self._running = True

    def __enter__(self) -> Any:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None and issubclass(exc_type, KeyboardInterrupt):
            self._abandon(f"Training ended with {exc_type.__name__}")
        self.close()

    def _abandon(self, why: str) -> None:
        """Stop at once (Ctrl-C): what is still uploading is abandoned, not committed; the engine's close says
        so in one warning (``"Closing cloudckpt (" + why + "): abandoned the upload of ..."``), nothing when
        nothing was pending; ``close()`` follows."""
        self._abandon_ran = True
        self._engine.close(timeout=0, reason=why)


def _close_at_exit(ref: "weakref.ref[EngineLifecycle]") -> None:
    """At interpreter exit, close a callback that ``fit`` left open (it raised)."""
    callback = ref()
    if callback is None or not callback._running:
        return
    interrupt = interrupted_exit()
    if interrupt is not None:
        callback._abandon(f"Interpreter exit after {type(interrupt).__name__}")
        callback.close()
        return
    engine = callback._engine
    try:
        pending = engine.pending_steps()
        if pending:
            log.warning("Interpreter exit while training with cloudckpt: waiting for step(s) %s to commit to %s "
                        "(upload_timeout=%s; Ctrl-C abandons them).", pending, engine.url, engine.upload_timeout)
        callback.close()
    except KeyboardInterrupt:  # Ctrl-C once the warning is out: the uploads are abandoned; the exit goes on
        # Raised in close()'s wait, close() abandoned them and said so. Raised before (while the warning was written,
        # as close() began: outside its handler) nothing did: swallowed, the exit would wait for the uploads' threads.
        if not callback._abandon_ran:
            callback._abandon("KeyboardInterrupt while waiting for the uploads to commit")
            callback.close()
