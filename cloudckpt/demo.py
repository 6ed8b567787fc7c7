"""The demo behind ``cloudckpt demo``: train a small model with checkpoints going to S3 on an embedded server.

No cloud account needed: an in-process moto S3 server on 127.0.0.1 plays the
bucket, and the data path is the real one (s3fs over HTTP).
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass

from .catalog import CheckpointInfo, list_checkpoints
from .embedded import EmbeddedS3
from .uploader import UploadStats

log = logging.getLogger("cloudckpt")


@dataclass
class DemoResult:
    """What the demo did: the bucket URL, what is committed there, and the uploader's counters."""

    url: str
    last_step: int
    checkpoints: list[CheckpointInfo]
    stats: UploadStats
    resumed_from: int | None = None


def _train(url: str, storage_options: dict, local_dir: str, steps: int, save_steps: int) -> tuple[int, int, UploadStats]:
    import numpy as np
    import tensorflow as tf

    from .hook import CheckpointSaverHook

    with tf.Graph().as_default():
        rng = np.random.default_rng(0)
        features = rng.normal(size=(256, 16)).astype(np.float32)
        labels = (features @ rng.normal(size=(16, 1))).astype(np.float32)
        global_step = tf.compat.v1.train.get_or_create_global_step()
        init = tf.compat.v1.glorot_uniform_initializer(seed=0)
        w1 = tf.compat.v1.get_variable("w1", [16, 32], initializer=init)
        w2 = tf.compat.v1.get_variable("w2", [32, 1], initializer=init)
        hidden = tf.nn.relu(tf.constant(features) @ w1)
        loss = tf.reduce_mean(tf.square(hidden @ w2 - labels))
        train_op = tf.compat.v1.train.AdamOptimizer(0.01).minimize(loss, global_step=global_step)
        tf.get_logger().setLevel(logging.ERROR)  # TF's own deprecation notices are noise in a demo
        # This toy model trains far faster than any real one, so let more saves queue behind an upload.
        hook = CheckpointSaverHook(url, save_steps=save_steps, local_dir=local_dir, storage_options=storage_options,
                                   max_pending=10)
        first: int | None = None
        with tf.compat.v1.train.MonitoredTrainingSession(
                checkpoint_dir=hook.local_dir, save_checkpoint_secs=None, save_summaries_steps=None,
                log_step_count_steps=None,
                hooks=[hook, tf.compat.v1.train.StopAtStepHook(last_step=steps)]) as sess:
            while not sess.should_stop():
                if first is None:
                    first = int(sess.run(global_step))
                _, value = sess.run([train_op, loss])
        log.info("Demo training from step %d finished at step %d (loss %.4f).", first or 0, steps, value)
        return first or 0, steps, hook.stats()


def run_demo(steps: int = 200, save_steps: int = 50, bucket: str = "cloudckpt-demo") -> DemoResult:
    """Train ``steps`` steps saving every ``save_steps`` to ``s3://<bucket>/runs/demo`` on an embedded server,
    then resume on a fresh local directory (a new VM) for ``save_steps`` more."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    with EmbeddedS3() as server, tempfile.TemporaryDirectory(prefix="cloudckpt-demo-") as workdir:
        url = server.create_bucket(bucket) + "/runs/demo"
        _train(url, server.storage_options, os.path.join(workdir, "vm1"), steps, save_steps)
        # A preempted VM comes back with an empty disk: the hook restores from the bucket and goes on.
        resumed_from, last, stats = _train(url, server.storage_options, os.path.join(workdir, "vm2"),
                                           steps + save_steps, save_steps)
        return DemoResult(url=url, last_step=last, checkpoints=list_checkpoints(url, server.storage_options),
                          stats=stats, resumed_from=resumed_from)
