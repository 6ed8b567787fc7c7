"""Checkpoints left uncommitted at interpreter exit commit over S3 (``cloudckpt.shutdown``).

By ``atexit`` time Python has shut every ``ThreadPoolExecutor`` down (asyncio's default executor
too, where aiobotocore resolves host names): a commit that needed a new connection then failed,
retried as if transient ("cannot schedule new futures after shutdown") for over a minute, and the
newest checkpoint was lost. Real processes, real Keras / TensorFlow, the moto server over HTTP.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import cloudckpt
from cloudckpt.retry import is_transient

from support.fault_proxy import FaultProxy

KERAS = """
import logging; logging.basicConfig(level=logging.INFO)
import numpy as np, keras, cloudckpt.keras
model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16), keras.layers.Dense(1)])
model.compile(keras.optimizers.Adam(1e-2), loss="mse")
class Boom(keras.callbacks.Callback):
    def on_epoch_end(self, epoch, logs=None):
        if epoch == 1:
            raise RuntimeError("user code failed at epoch 2")
callback = {make}
try:
    model.fit(np.random.rand(64, 8), np.random.rand(64, 1), epochs=5, callbacks=[callback, Boom()], verbose=0)
except RuntimeError:
    pass  # the script ends here: neither close() nor `with callback:`
"""

TF2 = """
import logging; logging.basicConfig(level=logging.INFO)
import tensorflow as tf, cloudckpt
w = tf.Variable(tf.zeros([256, 256]))
manager = cloudckpt.CheckpointManager(tf.train.Checkpoint(w=w), URL, max_to_keep=5, storage_options=OPTIONS,
                                      max_pending=5)
manager.restore_or_initialize()
for i in range(1, 4):
    w.assign_add(tf.ones([256, 256]))
    manager.save()
"""

CASES = {
    "keras.ModelCheckpoint": (KERAS.format(make='cloudckpt.keras.ModelCheckpoint(URL + "/m-{epoch:02d}.keras", '
                                                'storage_options=OPTIONS)'), [2, 4]),
    "CheckpointManager": (TF2, [1, 2, 3]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_what_a_program_left_uncommitted_commits_at_interpreter_exit(case, s3_url, s3_options, moto_server,
                                                                     tmp_path):
    script, steps = CASES[case]  # steps: those committed when every save commits
    with FaultProxy(moto_server.endpoint) as proxy:
        proxy.set_faults(latency=0.5, only_methods=["PUT"])  # the last saves are still committing at exit
        prelude = f"URL = {s3_url!r}\nOPTIONS = {dict(s3_options, endpoint_url=proxy.url)!r}\n"
        done = subprocess.run([sys.executable, "-c", prelude + script], capture_output=True, text=True, timeout=240,
                              env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CLOUDCKPT_CACHE_DIR": str(tmp_path)})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Interpreter exit" in done.stderr, done.stderr[-3000:]  # it was left to the exit, and said so
    assert "was not committed" not in done.stderr and "Retrying" not in done.stderr, done.stderr[-3000:]
    found = [c.step for c in cloudckpt.list_checkpoints(s3_url, storage_options=s3_options)]
    assert found == steps


def test_a_call_made_after_executors_shut_down_is_not_retried():
    """What aiobotocore's connect raised at exit (HTTPClientError around the executor's RuntimeError)."""
    from botocore.exceptions import HTTPClientError

    try:
        try:
            raise RuntimeError("cannot schedule new futures after interpreter shutdown")
        except RuntimeError as inner:
            raise HTTPClientError(error=inner) from inner
    except HTTPClientError as exc:
        assert not is_transient(exc)
    assert is_transient(HTTPClientError(error=ConnectionResetError("reset by peer")))


def test_an_interrupt_ends_a_program_but_not_an_interactive_session(monkeypatch):
    """``interrupted_exit``: the KeyboardInterrupt the interpreter kept (``sys.last_value``; ``last_exc`` on 3.12+)
    when it ended a script; None for any other exception, and in an interactive session, where Ctrl-C (even at
    the prompt, which keeps one too) ends a statement only."""
    from cloudckpt.shutdown import interrupted_exit

    interrupt = KeyboardInterrupt()
    for name in ("last_exc", "last_value"):
        monkeypatch.delattr(sys, name, raising=False)
    monkeypatch.delattr(sys, "ps1", raising=False)
    assert interrupted_exit() is None
    monkeypatch.setattr(sys, "last_value", RuntimeError("boom"), raising=False)
    assert interrupted_exit() is None
    monkeypatch.setattr(sys, "last_value", interrupt, raising=False)
    assert interrupted_exit() is interrupt
    monkeypatch.setattr(sys, "ps1", ">>> ", raising=False)
    assert interrupted_exit() is None
