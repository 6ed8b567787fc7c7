"""Demo trainer started by the spot-training examples.

The startup scripts install this file as /opt/cloudckpt/train.py and run it
under systemd (unit cloudckpt-train.service). Replace it with your own
training code (examples' `training_script` variable); the only contract is the
environment set by the unit:

  CLOUDCKPT_CHECKPOINT_DIR  s3://<bucket>/<prefix> or gs://<bucket>/<prefix>,
                            the module's `checkpoint_dir` output
  CLOUDCKPT_SAVE_STEPS      steps between checkpoints
  CLOUDCKPT_MAX_STEPS       stop after this global step

On a fresh VM the hook restores the newest committed checkpoint from
CLOUDCKPT_CHECKPOINT_DIR, so a Spot VM that was preempted and started again
picks up where the last commit left off. With preemption="auto" the hook also
watches for the cloud's preemption notice (GCE / EC2 metadata, and SIGTERM,
which systemd and the GCE shutdown script send) and commits a final
checkpoint before the VM goes. The process then exits 0, so the systemd unit
(Restart=on-failure) does not start it again on a dying VM.
"""

import os

import tensorflow as tf

import cloudckpt

CHECKPOINT_DIR = os.environ["CLOUDCKPT_CHECKPOINT_DIR"]
SAVE_STEPS = int(os.environ.get("CLOUDCKPT_SAVE_STEPS", "500"))
MAX_STEPS = int(os.environ.get("CLOUDCKPT_MAX_STEPS", "100000"))


def build_model():
    """A tiny linear regression, standing in for the real model."""
    global_step = tf.compat.v1.train.get_or_create_global_step()
    features = tf.random.normal([256, 32], seed=1)
    true_w = tf.constant([[float(i % 7) - 3.0] for i in range(32)])
    labels = tf.matmul(features, true_w)
    weights = tf.compat.v1.get_variable("weights", [32, 1])
    loss = tf.reduce_mean(tf.square(tf.matmul(features, weights) - labels))
    optimizer = tf.compat.v1.train.GradientDescentOptimizer(0.01)
    return optimizer.minimize(loss, global_step=global_step), loss


def main():
    with tf.Graph().as_default():
        train_op, loss = build_model()
        # Restores the newest committed checkpoint on start, commits every
        # SAVE_STEPS, and on a Spot notice / SIGTERM stops training and
        # commits a final checkpoint within the platform's deadline.
        hook = cloudckpt.CheckpointSaverHook(
            CHECKPOINT_DIR, save_steps=SAVE_STEPS, preemption="auto"
        )
        with tf.compat.v1.train.MonitoredTrainingSession(
            # The Saver writes to the hook's local staging directory; the
            # hook uploads from there. TF's own saver is switched off.
            checkpoint_dir=hook.local_dir,
            save_checkpoint_secs=None,
            save_summaries_steps=None,
            hooks=[hook, tf.compat.v1.train.StopAtStepHook(last_step=MAX_STEPS)],
        ) as sess:
            while not sess.should_stop():
                sess.run([train_op, loss])


if __name__ == "__main__":
    main()
