"""Scenario 10: incremental commits (``cloudckpt.incremental``): bytes sent and commit time vs a full upload.

Two workloads, each save committed twice side by side per repetition (the order alternating) by two
writers continuing their own directories: once *incremental* (unchanged parts copied server-side from
the writer's previous checkpoint) and once *full* (every byte sent).
Both are ``commit_checkpoint`` as the uploader runs it: checksums, uploads or copies, size check,
manifest, commit log entry, TF state file.

* **fine-tuning**: a real ``tf.train.Checkpoint`` of a frozen backbone (4 variables, >= 90% of the
  bytes) and a small trainable head with two optimizer-slot-like variables; between saves the head
  and its slots change. The head sits between backbone tensors in TF's key order and the slots at
  the end, as a Keras model's head and optimizer slots do. Figures: bytes sent per commit / checkpoint
  size (target <= 15%), the commit time ratio incremental / full and the client CPU-seconds of each.
  On a local server the server-side copy costs the server about what receiving the bytes does, so
  there the time ratio shows what copying costs, not what a network saves.
* **dense**: every part of every file changes between saves (one byte per MiB), so an incremental
  commit finds nothing to copy; target: commit time <= 1.05x a full upload (no regression). Also the
  manifest's checksum pass with per-part crc32c vs whole-file crc32c only (target <= 1.05x).

"Full" is the same flow (a continuing writer, the same transport settings) with
``TransferOptions(incremental=False)``: every byte sent.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

import numpy as np

from .common import MB, Scenario, order_balanced_ratio, ratio, rotate, summarize, timed, timed_cpu
from .context import Context

KEY, TITLE = "incremental", "10. Incremental commits vs full upload"


def sizes(cfg: Any) -> tuple[int, int, int]:
    """(backbone bytes, head bytes, dense checkpoint bytes) by mode."""
    if cfg.mode == "tiny":
        return 24 * MB, 1 * MB, 16 * MB
    if cfg.mode == "quick":
        return 256 * MB, 4 * MB, 256 * MB
    return 512 * MB, 8 * MB, 512 * MB


class _FineTuning:
    """A TF checkpoint: frozen backbone (4 variables) + a head and two slots that change between saves."""

    def __init__(self, backbone_bytes: int, head_bytes: int) -> None:
        import tensorflow as tf

        self.tf = tf
        rng = np.random.default_rng(0)
        piece = backbone_bytes // 4 // 4
        self.layers = {f"layer{i}": tf.Variable(rng.standard_normal(piece, dtype=np.float32), trainable=False)
                       for i in range(4)}
        n = head_bytes // 4
        self.head = {"layer2_head": tf.Variable(tf.zeros([n])), "optimizer_m": tf.Variable(tf.zeros([n])),
                     "optimizer_v": tf.Variable(tf.zeros([n]))}
        self.checkpoint = tf.train.Checkpoint(**self.layers, **self.head)
        self.rng = rng
        self.frozen_bytes = 4 * piece * 4

    def save(self, directory: str, step: int) -> dict[str, str]:
        for variable in self.head.values():
            variable.assign(self.rng.standard_normal(variable.shape[0], dtype=np.float32))
        prefix = os.path.join(directory, f"model.ckpt-{step}")
        self.checkpoint.write(prefix)
        return {name: os.path.join(directory, name) for name in os.listdir(directory)
                if name.startswith(f"model.ckpt-{step}.")}


def _dense_save(directory: str, step: int, rng: np.random.Generator, data: bytearray) -> dict[str, str]:
    for offset in range(0, len(data), MB):  # every part changes
        data[offset] = (data[offset] + 1 + int(rng.integers(0, 200))) % 256
    files = {}
    for suffix, content in (("data-00000-of-00001", data), ("index", rng.bytes(4096))):
        name = f"model.ckpt-{step}.{suffix}"
        with open(os.path.join(directory, name), "wb") as f:
            f.write(content)
        files[name] = os.path.join(directory, name)
    return files


def run(ctx: Context) -> Scenario:
    from cloudckpt.commit import LocalCheckpoint, build_manifest, commit_checkpoint
    from cloudckpt.manifest import crc32c_of_file
    from cloudckpt.remote import RemoteStore
    from cloudckpt.transfer import TransferOptions
    from cloudckpt.writers import Writer

    backbone_bytes, head_bytes, dense_bytes = sizes(ctx.cfg)
    sc = Scenario(KEY, TITLE, params={"server": ctx.server_name, "figure": "seconds of commit_checkpoint "
                                      "(checksums, upload/copy, manifest, log, state file) of the next checkpoint "
                                      "of a continuing writer; incremental and full interleaved, order alternating"})
    work: dict[str, list[float]] = {"fine_tune_copied_mib": [], "dense_copied_mib": []}
    checksums: dict[str, list[float]] = {"parts": [], "whole": []}

    def measure(name: str, save: Any) -> tuple[list[float], list[float], list[float], int]:
        """Per repetition: (incremental seconds, full seconds, fraction of bytes sent incrementally, size)."""
        local = ctx.scratch(name)
        stores, writers = {}, {}
        for variant in ("incremental", "full"):  # the same (default) part sizes; only copying differs
            transfer = TransferOptions(incremental=variant == "incremental")
            stores[variant] = RemoteStore(ctx.url(f"{name}/{variant}"), ctx.storage_options, transfer=transfer)
            writers[variant] = Writer(stores[variant])
        files = save(local, 1)
        for variant in stores:  # each writer's first checkpoint (the source of the next)
            commit_checkpoint(stores[variant], LocalCheckpoint(1, "model.ckpt-1", files), writer=writers[variant])
        seconds: dict[str, list[float]] = {"incremental": [], "full": []}
        first: list[bool] = []  # per timed repetition: the incremental commit ran first
        cpu: dict[str, list[float]] = {"incremental": [], "full": []}
        sent: list[float] = []
        size = 0
        for rep in range(ctx.cfg.warmup_reps + ctx.cfg.reps):
            step = rep + 2
            files = save(local, step)
            os.sync()  # the save's writeback does not land on whichever commit runs first
            ckpt = LocalCheckpoint(step, f"model.ckpt-{step}", files)
            size = ckpt.total_size
            if name == "dense":
                checksums["parts"].append(timed(lambda: build_manifest(ckpt))[0])
                checksums["whole"].append(timed(lambda: [crc32c_of_file(p) for p in files.values()])[0])
            times: dict[str, float] = {}
            cpus: dict[str, float] = {}
            for variant in rotate(["incremental", "full"], rep):
                times[variant], cpus[variant], result = timed_cpu(lambda: commit_checkpoint(
                    stores[variant], ckpt, writer=writers[variant]))
                if variant == "incremental":
                    sent_fraction = result.bytes_uploaded / size
                    work[f"{name}_copied_mib"].append(result.bytes_copied / MB)
                else:
                    assert result.bytes_copied == 0
            for variant in stores:  # the previous checkpoints go, as retention would (moto holds objects in RAM)
                stores[variant].delete([n.replace(f"-{step}.", f"-{step - 1}.") for n in files] +
                                       [f"model.ckpt-{step - 1}.manifest.json"])
            for old in [n for n in os.listdir(local) if n.startswith(f"model.ckpt-{step - 1}.")]:
                os.unlink(os.path.join(local, old))
            if rep >= ctx.cfg.warmup_reps:
                first.append(next(iter(times)) == "incremental")
                for variant, value in times.items():
                    seconds[variant].append(value)
                    cpu[variant].append(cpus[variant])
                sent.append(sent_fraction)
            ctx.log(f"{KEY}: {name} rep {rep}: incremental {times['incremental']:.2f}s (sent "
                    f"{sent_fraction:.1%}), full {times['full']:.2f}s")
        ctx.clean_bucket()
        shutil.rmtree(local, ignore_errors=True)
        for variant, values in cpu.items():
            sc.figures[f"{name}_cpu_{variant}"] = summarize(values, "CPU-s", label=f"client CPU-s per {variant} commit")
        return seconds["incremental"], seconds["full"], sent, size, first

    model = _FineTuning(backbone_bytes, head_bytes)
    inc, full, sent, size, first = measure("fine_tune", model.save)
    sc.ratios["fine_tune_cpu_incremental/fine_tune_cpu_full"] = ratio(sc.figures["fine_tune_cpu_incremental"],
                                                                      sc.figures["fine_tune_cpu_full"])
    sc.params.update(fine_tune_checkpoint_mib=round(size / MB, 1),
                     fine_tune_frozen_fraction=round(model.frozen_bytes / size, 3))
    sc.figures["fine_tune_incremental"] = summarize(inc, "s", label="incremental commit (unchanged parts copied)")
    sc.figures["fine_tune_full"] = summarize(full, "s", label="full upload of the same checkpoint")
    sc.figures["fine_tune_sent_fraction"] = summarize(sent, "x", label="bytes sent / checkpoint size")
    sc.ratios["fine_tune_sent_fraction/checkpoint"] = ratio(sc.figures["fine_tune_sent_fraction"],
                                                            summarize([1.0], "x"), target="<= 0.15")
    sc.ratios["fine_tune_incremental/fine_tune_full"] = _time_ratio(sc, "fine_tune", inc, full, first, None)

    rng = np.random.default_rng(1)
    data = bytearray(rng.bytes(dense_bytes))
    inc, full, sent, size, first = measure("dense", lambda d, step: _dense_save(d, step, rng, data))
    sc.params.update(dense_checkpoint_mib=round(size / MB, 1), work=work)
    sc.figures["dense_incremental"] = summarize(inc, "s", label="incremental commit (nothing to copy)")
    sc.figures["dense_full"] = summarize(full, "s", label="full upload (TransferOptions(incremental=False))")
    sc.ratios["dense_incremental/dense_full"] = _time_ratio(sc, "dense", inc, full, first, "<= 1.05")
    parts, whole = checksums["parts"][ctx.cfg.warmup_reps:], checksums["whole"][ctx.cfg.warmup_reps:]
    sc.figures["checksums_with_parts"] = summarize(parts, "s", label="build_manifest, per-part crc32c (one thread)")
    sc.figures["checksums_whole_file"] = summarize(whole, "s", label="crc32c_of_file of each file (one thread)")
    sc.ratios["checksums_with_parts/checksums_whole_file"] = ratio(
        sc.figures["checksums_with_parts"], sc.figures["checksums_whole_file"], target="<= 1.05",
        paired=[a / b for a, b in zip(parts, whole)])
    return sc


def _time_ratio(sc: Scenario, name: str, inc: list[float], full: list[float], first: list[bool],
                target: str | None) -> dict[str, Any]:
    """Incremental / full commit time: the order-balanced mean of the per-repetition pairs (whichever commit
    of a pair runs first is slower here, by more than what is measured) and, as a note, the medians'."""
    paired = [a / b for a, b in zip(inc, full)]
    medians = sc.figures[f"{name}_incremental"]["median"] / sc.figures[f"{name}_full"]["median"]
    out = ratio(sc.figures[f"{name}_incremental"], sc.figures[f"{name}_full"], target=target, paired=paired,
                value=order_balanced_ratio(list(zip(paired, first))),
                note=f"order-balanced geometric mean of the pairs; ratio of the medians {medians:.2f}")
    out["paired_incremental_first"] = first
    return out
