"""``TransferOptions``: how many bytes a commit or a restore moves at once (part size, files and parts in
flight, download streams).

One validated, immutable object instead of module constants. Every adapter
(``CheckpointSaverHook``, ``UploadListener``, ``CheckpointManager``, the Keras
callbacks), ``CheckpointEngine``, ``push_checkpoints`` (``cloudckpt push``'s flags) and the restores
(``download_checkpoint``, ``pull_checkpoint``) take it as ``transfer=``; the store's
transport reads ``part_size``, ``max_parts_in_flight`` and ``multipart_threshold``, the uploader (and
``push_checkpoints``) ``max_files_in_flight``, a restore ``max_download_streams``.

One set of defaults, the ones ``python -m bench`` measured for cloudckpt's own
S3 transport (``s3_transport.PART_SIZE`` = 16 MiB parts, ``PARTS_IN_FLIGHT`` =
4 parts in flight, ``MULTIPART_THRESHOLD`` = one PUT below 200 MiB; README, scenarios 3/4), 4 files in
flight. ``TransferOptions()``
and ``transfer=None`` are the same thing on every store: turning one field
(say ``incremental=False``) changes only that field.

Memory of an upload in flight depends on the data path:

* ``s3://`` through cloudckpt's transport sends parts from the file
  (``sendfile``): no part buffers, whatever the sizes.
* the fsspec paths buffer parts: on the s3fs fallback (``s3_additional_kwargs``,
  a proxy, an aiobotocore session... keep the data path on s3fs) up to
  ``max_files_in_flight x max_parts_in_flight x part_size`` bytes
  (``max_buffer_bytes``: 4 x 4 x 16 MiB = 256 MiB by default; s3fs reads a file
  smaller than two parts whole); gcsfs sends one ``part_size`` chunk per file
  at a time (4 x 16 MiB). Lower ``part_size`` or the counts to bound it.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import ConfigError, bool_option, integer_option
from .s3_transport import MULTIPART_THRESHOLD, PART_SIZE, PARTS_IN_FLIGHT

__all__ = ["TransferOptions", "MiB"]

MiB = 1 << 20
MIN_PART_SIZE = 5 * MiB  # S3's smallest multipart part (all but the last)
MAX_PART_SIZE = 5 << 30  # S3's largest part
MAX_PUT_SIZE = 5 << 30  # S3's largest PutObject
PART_ALIGNMENT = 256 << 10  # GCS resumable uploads send chunks in multiples of 256 KiB
MAX_IN_FLIGHT = 64
# Connections of one restore (on s3://, ranged GETs in flight from one queue of every file's ranges; elsewhere
# files at once). Measured by bench scenario 4 (1 GiB in
# 8 files, SeaweedFS, 2 cores): 8 streams moved more MiB/s at ~half the CPU per GiB of 32 (8 files x 4 ranges),
# whose threads mostly wait for each other's GIL; 16 measured alike (8-rep runs, 2026-12-01).
DOWNLOAD_STREAMS = 8


@dataclass(frozen=True)
class TransferOptions:
    """How a commit moves bytes.

    Attributes:
        part_size: bytes per multipart part (S3) / resumable chunk (GCS): an
            integer in [5 MiB, 5 GiB], a multiple of 256 KiB. Every integer field takes
            any integer but a bool (a numpy integer too: stored as the ``int``). Default 16 MiB
            (``s3_transport.PART_SIZE``).
        multipart_threshold: on ``s3://`` through cloudckpt's transport, files of at
            least this many bytes (and larger than ``part_size``) go in a multipart upload,
            smaller ones in one PutObject (boto3's ``TransferConfig.multipart_threshold``):
            an integer in [5 MiB, 5 GiB]. Default 200 MiB
            (``s3_transport.MULTIPART_THRESHOLD``, rclone's S3 ``upload_cutoff``): a
            CompleteMultipartUpload costs a store work per byte (measured on moto by the
            bench); a checkpoint of several files keeps ``max_files_in_flight`` PUTs going.
            The s3fs fallback decides on its own (one PutObject below 2 x ``part_size``).
        max_files_in_flight: files of one checkpoint uploaded (and checksummed)
            concurrently, in [1, 64]. Default 4.
        max_parts_in_flight: parts of one file sent concurrently, in [1, 64].
            Default 4 (``s3_transport.PARTS_IN_FLIGHT``).
        max_download_streams: connections of one restore or re-reading verify, in [1, 64]: on
            ``s3://`` the ranged GETs in flight, taken from one queue of every file's ranges
            (largest file first, ranges of 32-128 MiB), so one large file gets them all;
            elsewhere files read at once.
            Default 8 (measured on 2 cores; a VM with more cores and a faster network may
            restore faster with more).
        incremental: on ``s3://`` through cloudckpt's transport, copy the parts of a
            checkpoint's files that are unchanged since the previous committed checkpoint
            server-side instead of sending them (``incremental.py``). Default True;
            False sends every byte (a store whose ``UploadPartCopy`` cannot be trusted).

    ``transfer=None`` means ``TransferOptions()``. On the fsspec paths (s3fs fallback, gcsfs)
    parts are buffered: up to ``max_buffer_bytes`` (files x parts x part size, 256 MiB by
    default) on s3fs; cloudckpt's ``s3://`` transport sends parts from the file, unbuffered.

    Raises:
        ConfigError: (a ``ValueError``) a field out of range; the message names the
            field and the allowed range.
    """

    part_size: int = PART_SIZE
    max_files_in_flight: int = 4
    max_parts_in_flight: int = PARTS_IN_FLIGHT
    incremental: bool = True
    max_download_streams: int = DOWNLOAD_STREAMS
    multipart_threshold: int = MULTIPART_THRESHOLD

    def __post_init__(self) -> None:
        incremental = bool_option(self.incremental)
        if incremental is None:
            raise ConfigError(f"TransferOptions.incremental must be True or False, got {self.incremental!r}.")
        object.__setattr__(self, "incremental", incremental)  # a numpy bool stored as the bool
        _check_int(self, "part_size", MIN_PART_SIZE, MAX_PART_SIZE, " bytes (5 MiB to 5 GiB)")
        if self.part_size % PART_ALIGNMENT:
            raise ConfigError(f"TransferOptions.part_size must be a multiple of 256 KiB ({PART_ALIGNMENT} bytes), "
                              f"got {self.part_size!r}.")
        _check_int(self, "multipart_threshold", MIN_PART_SIZE, MAX_PUT_SIZE, " bytes (5 MiB to 5 GiB)")
        _check_int(self, "max_files_in_flight", 1, MAX_IN_FLIGHT)
        _check_int(self, "max_parts_in_flight", 1, MAX_IN_FLIGHT)
        _check_int(self, "max_download_streams", 1, MAX_IN_FLIGHT)

    @property
    def max_buffer_bytes(self) -> int:
        """Upper bound of part buffers held at once on the fsspec paths (files x parts x part size), bytes.

        cloudckpt's ``s3://`` transport holds none (parts are sent from the file).
        """
        return self.max_files_in_flight * self.max_parts_in_flight * self.part_size

    @classmethod
    def of(cls, value: "TransferOptions | None") -> "TransferOptions":
        """``value``, or the defaults when None.

        Raises:
            ConfigError: ``value`` is neither None nor a ``TransferOptions``.
        """
        if value is None:
            return cls()
        if not isinstance(value, cls):
            raise ConfigError(f"transfer must be a cloudckpt.TransferOptions or None, got {value!r}.")
        return value


def _check_int(options: TransferOptions, name: str, low: int, high: int, unit: str = "") -> None:
    """Refuse field ``name`` unless an integer in [low, high]; store it as a plain ``int`` (a numpy integer...)."""
    value = getattr(options, name)
    number = integer_option(value)
    if number is None or not low <= number <= high:
        raise ConfigError(f"TransferOptions.{name} must be an integer in [{low}, {high}]{unit}, got {value!r}.")
    object.__setattr__(options, name, number)
