"""``cloudckpt.keras.ModelCheckpoint``: Keras 3's ``ModelCheckpoint`` with ``filepath`` a URL template.

Keras decides, as always, when to save and whether a save is an improvement
(``save_freq``, ``save_best_only``, ``monitor``, ``mode``,
``initial_value_threshold``): this class subclasses
``keras.callbacks.ModelCheckpoint`` and replaces only how a file is written
(its ``_save_model``). The file is written to a local directory with
``model.save`` / ``model.save_weights``, then committed in the background by a
``CheckpointEngine`` (file create-only, a checksummed manifest, a commit-log
entry as the commit point), so ``fit`` never waits on the network.

**Names.** A committed object is never overwritten, so the stored name
carries the step (``optimizer.iterations`` at the save) before the extension:
``model-{epoch:02d}-{val_loss:.2f}.keras`` saved at step 32 is stored as
``model-04-0.12-32.keras`` (the ``keras`` layout, ``layout.py``); that is the
name ``list_checkpoints``, ``cloudckpt ls`` and ``cloudckpt pull`` show. Where
Keras would overwrite a file (a name without fields, ``best.keras``, or a name
formatted again), the new save is committed first and then the older ones
of that name are deleted through the commit log (un-committed before their
files go), so one committed file per formatted name remains.

**Runs again into the same directory.** ``fit`` run again from scratch (a
fresh model: a notebook cell run again, a job restarted without
``BackupAndRestore``) saves the same stored name at the same step
(``model-01-4.keras``) with other contents. Keras overwrites the file, and so
does this class: the save is committed with ``replace_committed``
(``commit.py``), so in the uploader thread, in order with the other commits,
the committed file of that name is un-committed through the commit log and
deleted, then the new one is uploaded and committed under the same name.
Readers never see a half-written file, but **between that deletion and the
new commit the name has no committed file: a crash (or a failed upload) in
that window leaves neither the old file nor the new one** for that name; the
other names are untouched. Identical contents stay "already committed"
(nothing uploaded). Files of the earlier run whose names the new run does not
save stay, as Keras leaves them. (The TF adapters and ``BackupAndRestore``
keep refusing a different save at a committed step: there it is a conflict.)

Source of the semantics: ``keras.callbacks.ModelCheckpoint`` (Keras 3,
https://keras.io/api/callbacks/model_checkpoint/ and
``keras/src/callbacks/model_checkpoint.py``).
"""

from __future__ import annotations

import logging
import os
from typing import Any, Mapping

from ..catalog import scan_directory
from ..commit import CommitResult
from ..engine import CheckpointEngine, default_local_dir, ensure_writable
from ..errors import ConfigError
from ..layout import KERAS_MODEL, basename_of
from ..transfer import TransferOptions
from ..urls import as_url, display_url
from ._backend import LEGACY, keras
from ._lifecycle import EngineLifecycle, check_positive_int_or_epoch, iterations

log = logging.getLogger("cloudckpt")

# What Keras' ModelCheckpoint calls on itself, and this class relies on (checked at construction).
_KERAS_METHODS = ("_save_model", "_should_save_model", "_get_file_path", "_should_save_on_batch")
_WEIGHTS_EXT = ".weights.h5"
_MODEL_EXTS = (".keras", ".h5")


class ModelCheckpoint(EngineLifecycle, keras.callbacks.ModelCheckpoint):
    """Saves the model (or its weights) during ``fit`` and commits each file to a URL (Keras 3).

    ``keras.callbacks.ModelCheckpoint``'s arguments and semantics, with ``filepath`` a
    URL template: ``"s3://bucket/run/model-{epoch:02d}-{val_loss:.2f}.keras"``. The
    directory part (up to the last ``/``) must not contain format fields; the file
    name may use ``{epoch}``, ``{batch}`` (with an integer ``save_freq``) and any key
    of the logs, as in Keras. Each file is saved locally, then committed in the
    background; the stored name carries the step (see the module docstring):
    ``model-04-0.12-32.keras``. ``cloudckpt.list_checkpoints(directory)`` and
    ``cloudckpt ls`` list them; ``cloudckpt pull`` / ``download_checkpoint`` fetch
    and verify one, which ``keras.models.load_model`` (or ``model.load_weights``
    for ``.weights.h5``) opens.

    When training begins the callback registers as the directory's writer,
    continuing its committed checkpoints (an older writer still running is
    fenced). When it ends, ``on_train_end`` waits for every file to commit.

    Args:
        filepath: URL template of the files (any fsspec URL or a local path); must end in
            ``.keras`` or ``.h5`` (the whole model), or ``.weights.h5`` with
            ``save_weights_only=True``.
        monitor, verbose, save_best_only, save_weights_only, mode, save_freq,
            initial_value_threshold: as in ``keras.callbacks.ModelCheckpoint``
            (``save_freq``: ``"epoch"`` or a number of batches >= 1).
        storage_options: fsspec options for the store (``endpoint_url``, ``key``...); never logged.
        max_pending: saves allowed to wait behind the one uploading (>= 1); past that the
            oldest waiting one is dropped (logged, ``stats().dropped``).
        upload_timeout: seconds ``on_train_end`` / ``close()`` wait for files still
            uploading (None: until they are committed).
        transfer: part size, files and parts in flight (``cloudckpt.TransferOptions``).
        summary_dir: write commit lag, throughput, queue depth, retries, drops and failures
            as TensorBoard scalars there after each commit (None: off).

    Raises:
        ConfigError: (a ``ValueError``) a wrong extension, format fields in the
            directory part, an invalid ``save_freq``, an unusable URL; when training
            begins: a missing bucket; at a save: a format field of the file name that
            is not a logged metric (Keras' own ``KeyError`` would quote the raw URL).
        UploadError / FencedError: during ``fit``, a file could not be committed
            (raised at the next batch or epoch end, or in ``on_train_end``).
        ImportError: this Keras' ModelCheckpoint lacks the methods this class builds on.
    """

    def __init__(
        self,
        filepath: str,
        monitor: str = "val_loss",
        verbose: int = 0,
        save_best_only: bool = False,
        save_weights_only: bool = False,
        mode: str = "auto",
        save_freq: str | int = "epoch",
        initial_value_threshold: float | None = None,
        *,
        storage_options: Mapping[str, Any] | None = None,
        max_pending: int = 2,
        upload_timeout: float | None = None,
        transfer: TransferOptions | None = None,
        summary_dir: str | None = None,
    ) -> None:
        missing = [m for m in _KERAS_METHODS if not callable(getattr(keras.callbacks.ModelCheckpoint, m, None))]
        if missing:
            raise ImportError(f"cloudckpt.keras.ModelCheckpoint builds on keras.callbacks.ModelCheckpoint's {missing}, "
                              f"which Keras {keras.__version__} does not have; use Keras 3.5 to 3.15"
                              + (" (TF_USE_LEGACY_KERAS is set: tf-keras is not supported here)." if LEGACY else "."))
        filepath = as_url(filepath, "filepath")
        directory, _, name = filepath.rpartition("/")
        if not name or "{" in directory or "}" in directory:
            raise ConfigError(f"ModelCheckpoint filepath {display_url(filepath)!r} must be <directory URL>/<file name "
                              "template>, with format fields ({epoch}, {val_loss:.2f}...) in the file name only.")
        if save_weights_only and not name.endswith(_WEIGHTS_EXT):
            raise ConfigError(f"With save_weights_only=True the ModelCheckpoint filepath must end in "
                              f"'{_WEIGHTS_EXT}' (Keras weights format), got {display_url(filepath)!r}.")
        if not save_weights_only and not name.endswith(_MODEL_EXTS):
            raise ConfigError(f"The ModelCheckpoint filepath must end in '.keras' (Keras model format) or '.h5', got "
                              f"{display_url(filepath)!r}.")
        save_freq = check_positive_int_or_epoch("save_freq", save_freq)
        super().__init__(filepath, monitor=monitor, verbose=verbose, save_best_only=save_best_only,
                         save_weights_only=save_weights_only, mode=mode, save_freq=save_freq,
                         initial_value_threshold=initial_value_threshold)
        self.directory = directory or "."
        local = default_local_dir(self.directory, storage_options)
        ensure_writable(local)
        self._stems: set[str] = set()  # basenames (formatted names without extension) committed or saved
        self._init_lifecycle(CheckpointEngine(self.directory, local, layout=KERAS_MODEL,
                                              storage_options=storage_options, max_pending=max_pending,
                                              upload_timeout=upload_timeout, transfer=transfer,
                                              summary_dir=summary_dir))

    @property
    def url(self) -> str:
        """The directory the files are committed to, in display form (credentials masked)."""
        return self._engine.url

    # -- Keras callback hooks -------------------------------------------------------------------------------
    def on_train_begin(self, logs: dict | None = None) -> None:
        """Check the store and register as the directory's writer (continuing its committed checkpoints)."""
        self._open()
        try:
            self._engine.register()
            # Names already committed: saving one of them again replaces it (Keras overwrites the file).
            self._stems = {basename_of(c.name) for c in scan_directory(self._engine.store).committed}
        except BaseException:
            self.close()
            raise

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        """Keras' bookkeeping; the step the epoch begins at, for the commit lag in steps (``stats``)."""
        super().on_epoch_begin(epoch, logs)
        self._count_steps_from(self.model)

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        """Keras' batch-level saving, then raise a failed commit (``UploadError``)."""
        self._count_batch(batch)
        super().on_train_batch_end(batch, logs)
        self._engine.raise_if_failed()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        """Keras' epoch-level saving, then raise a failed commit (``UploadError``)."""
        super().on_epoch_end(epoch, logs)
        self._engine.raise_if_failed()

    def on_train_end(self, logs: dict | None = None) -> None:
        """Wait (up to ``upload_timeout``) until every file is committed, then stop the uploads.

        Raises:
            UploadError: a file was not committed (``FencedError``: a newer writer took over).
        """
        try:
            self._engine.finish()
        finally:
            self.close()

    # -- what Keras' ModelCheckpoint calls to save ---------------------------------------------------------
    def _save_model(self, epoch: int, batch: int | None, logs: dict | None) -> None:
        """Keras decides (``_should_save_model``: ``save_best_only``, ``monitor``...); the file is written to
        ``local_dir`` under its stored name and queued for commit."""
        logs = logs or {}
        missing: str | None = None
        try:
            url = self._get_file_path(epoch, batch, logs)
        except KeyError as exc:  # Keras' message quotes the raw filepath, credentials and all: not kept
            missing = str(exc.__context__ if isinstance(exc.__context__, KeyError) else exc)
        if missing is not None:  # raised outside the handler: Keras' KeyError rides along as no __context__
            # Keras formats {batch} only for a save within an epoch (an integer save_freq), never at an epoch's end.
            fields = ["epoch"] + (["batch"] if batch is not None and "batch" not in logs else []) + sorted(logs)
            if missing == "'batch'" and batch is None:
                hint = ("{batch} is only set with an integer save_freq (a save every N batches); with "
                        "save_freq='epoch' remove it from the file name template")
            else:
                hint = "Fix the file name template (e.g. monitor 'val_' metrics only with validation data)"
            raise ConfigError(
                f"ModelCheckpoint filepath {display_url(self.filepath)!r} names a format field that is not a "
                f"logged metric ({missing}); fields available at this save: {', '.join(fields)}. {hint}.")
        name = url[len(self.directory) + 1:] if url.startswith(self.directory + "/") else url
        if "/" in name or not name:
            raise ConfigError(f"ModelCheckpoint file name {display_url(name)!r} (formatted from "
                              f"{display_url(self.filepath)!r}) is not a plain file name: a checkpoint directory "
                              "is flat.")
        stem, ext = _split_extension(name)
        step = iterations(self.model)
        stored = f"{stem}-{step}{ext}"
        # Keras' verbose message ("saving model to ...") names the object as stored: the name carries the step.
        if not self._should_save_model(epoch, batch, logs, display_url(f"{self.directory}/{stored}")):
            return
        path = os.path.join(self.local_dir, stored)
        if self.save_weights_only:
            self.model.save_weights(path, overwrite=True)
        else:
            self.model.save(path, overwrite=True)
        replaces = stem in self._stems
        self._stems.add(stem)
        try:
            self._engine.submit(step, [path], on_committed=(lambda result: self._replace_older(stem, result))
                                if replaces else None, replace_committed=True)  # Keras overwrites it
        finally:
            try:
                os.remove(path)  # the engine snapshotted it (a hard link)
            except FileNotFoundError:
                pass
        log.debug("Saved %s as step %d for %s.", name, step, self.url)

    def _replace_older(self, stem: str, result: CommitResult) -> None:
        """Keras overwrites a file saved again under the same name: once the new one is committed, delete
        the older committed files of that name (in the uploader thread; a failure is a housekeeping one)."""
        newest = result.manifest.prefix
        older = self._engine.delete_committed(
            select=lambda info: basename_of(info.name) == stem and info.name != newest,
            reason=f"Replaced by {newest} (a file saved again under its name)")
        if older:
            log.info("Deleted %s from %s: %s replaces them.", [c.name for c in older], self.url, newest)


def _split_extension(name: str) -> tuple[str, str]:
    for ext in (_WEIGHTS_EXT, *_MODEL_EXTS):
        if name.endswith(ext):
            return name[: -len(ext)], ext
    raise ConfigError(f"ModelCheckpoint file name {name!r} has no Keras extension (.keras, .h5, .weights.h5).")
