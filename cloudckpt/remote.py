"""The remote checkpoint directory: URL -> fsspec filesystem, with retries and clear errors.

``RemoteStore`` is the only place that talks to fsspec. Every operation is
retried according to a ``RetryPolicy`` and any backend exception is turned
into a ``RemoteError`` that names the operation, the URL and what to do.

The URL as given (with any credentials) goes to fsspec only: the filesystem
is built from the URL's scheme (``fsspec.get_filesystem_class``), never by
``url_to_fs``, so ``::`` is never a chain separator; the userinfo becomes the
filesystem's ``username`` / ``password`` options, never part of a path.
``store.url`` and every message carry the display form (``cloudckpt.urls``).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import logging
import os
import posixpath
import re
import sys
import threading
import time
import types
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence, TypeVar

import fsspec
import fsspec.callbacks
from fsspec.implementations.local import LocalFileSystem
from fsspec.implementations.memory import MemoryFileSystem

from .cancel import CancelSignal, TransferCancelled, TransferScope
from .errors import DEBUG_HINT, ConfigError, RemoteError
from .gcs_resumable import ChunkRetries, resuming_chunks, retrying_chunks
from .manifest import crc32c_of_file, crc32c_of_stream, crc32c_parts_of_stream
from .moto_mock import bypassed_mock_error, mock_transport, moto_mock_active
from .process_cache import ProcessCache
from .retry import RetryPolicy, describe_cause, is_connection_failure, is_transient
from .transfer import TransferOptions
from .s3_transport import (CopySource, DownloadFailed, S3Transport, aws_environment,
                           crc32c_combine, crc32c_hex_from_header, etag_md5, forget_sessions, md5_of_file,
                           transport_for, unquoted_etag)
from .urls import (CheckpointUrl, as_url, check_storage_options, display_url, install_backstop, is_local_path,
                   option_secrets, parse_url, redact, sanitized_cause)
from .waits import map_all

__all__ = ["RemoteStore", "RemoteObject", "open_directory", "is_local_path", "redact", "remote_error"]

log = logging.getLogger("cloudckpt")
install_backstop(log)
T = TypeVar("T")

_BACKEND_PACKAGES = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs",
                     "abfss": "adlfs", "adl": "adlfs", "sftp": "paramiko", "ssh": "paramiko", "smb": "smbprotocol",
                     "hdfs": "pyarrow", "oci": "ocifs"}
# Options some backends derive from a URL that make no sense for a directory of checkpoints:
# gcsfs reads "#<generation>" and s3fs "?versionId=" as object versions (we keep "#" a key character).
_URL_OPTIONS_IGNORED = frozenset({"version_aware"})


@dataclass(frozen=True)
class RemoteObject:
    """One object in the remote directory (name relative to it)."""

    name: str
    size: int
    modified: float | None  # POSIX seconds, when the backend reports it
    etag: str | None = None  # S3's ETag (without quotes), when the listing reports one
    crc32c: str | None = None  # 8 hex digits the store computed from the bytes it holds, if its listing says (GCS)


class RemoteStore:
    """A checkpoint directory on any fsspec filesystem.

    Args:
        url: directory URL (``s3://bucket/run``, ``gs://...``, ``memory://...``,
            ``file:///...``) or a local path: anything not starting with
            ``scheme://`` is a local path, whatever its characters. A URL's
            userinfo (``sftp://user:pw@host/dir``) is passed to the filesystem
            as ``username`` / ``password`` (s3fs: key / secret); a query string
            is refused (``ConfigError``): pass credentials in ``storage_options``.
        storage_options: keyword arguments for the fsspec filesystem
            (``endpoint_url``, ``key``/``secret``, ``token``...). Never logged.
        retry: how transient errors are retried.
        on_retry: called with a short cause label before every retry (for stats).
        transfer: part size and parts in flight of uploads, streams of restores (``TransferOptions``;
            default: its defaults).

    Attributes:
        url: the display form of the URL (credentials masked): use it in any message.
        root: the directory's path on the filesystem (``bucket/run``, ``/abs/dir``).

    Raises:
        ConfigError: unknown scheme, backend not installed, a query string, bad storage_options (an S3
            ``endpoint_url`` holding ``user:password@``), a local path that is a file.
        RemoteError: the backend failed while connecting (sftp...).
    """

    def __init__(
        self,
        url: str,
        storage_options: Mapping[str, Any] | None = None,
        *,
        retry: RetryPolicy | None = None,
        on_retry: Callable[[str], None] | None = None,
        transfer: TransferOptions | None = None,
    ) -> None:
        url = as_url(url)
        check_storage_options(storage_options)
        if retry is not None and not isinstance(retry, RetryPolicy):
            raise ConfigError(f"retry must be a cloudckpt.RetryPolicy or None, got a value of type "
                              f"{type(retry).__name__}.")
        _check_bucket(parse_url(url))
        self._location: CheckpointUrl = parse_url(url.rstrip("/") or url)  # the raw URL: fsspec only
        self.url = self._location.display
        self._secrets = self._location.secrets + option_secrets(storage_options)
        self.retry = retry or RetryPolicy()
        self._on_retry = on_retry
        self.transfer = TransferOptions.of(transfer)
        # set: retries end, no request starts, on s3:// requests in flight stop; per unit of work: transfer_scope
        self.cancel = CancelSignal()
        self._retries_seen = 0
        self._endpoint = _endpoint_of(storage_options, self._secrets)  # display form, for messages
        protocol = self._location.scheme or "file"
        endpoint = _raw_endpoint(storage_options)
        if endpoint is not None and parse_url(endpoint).userinfo is not None:
            self._secrets += parse_url(endpoint).secrets
            if protocol in _S3_PROTOCOLS:  # never sent: the host name would carry the password (DNS, Host header)
                raise ConfigError(
                    f"storage_options endpoint_url {self._endpoint!r} for {self.url!r} holds credentials "
                    "(user:password@): an S3 endpoint takes none. Pass them as key/secret (and token) in "
                    "storage_options or through the environment, and give endpoint_url as http(s)://host:port.")
        if protocol in _S3_PROTOCOLS and self._location.userinfo is None:
            _check_s3_key_pair(storage_options, self.url)
        self.fs, self.root = self._open(protocol, storage_options)
        self._resumes_chunks = type(self.fs) in _RESUMING_GCSFS  # gcsfs: failed upload chunks are resumed
        self.is_local = isinstance(self.fs, LocalFileSystem)
        if self.is_local and os.path.isfile(self.root):  # listing a file would find no checkpoint: say why
            raise ConfigError(f"{self.url!r} is a file, not a directory: point the URL at a checkpoint directory.")
        self._bulk_deletes = protocol in _S3_PROTOCOLS or protocol in _GCS_PROTOCOLS
        # s3:// file data goes through cloudckpt's own transport (sendfile uploads with crc32c, ranged GETs);
        # listings and small objects stay on s3fs. Not under moto's in-process mock (moto_mock.py).
        self._transport: S3Transport | None = None
        if protocol in _S3_PROTOCOLS and type(self.fs).__module__.startswith("s3fs"):
            # TransferOptions' defaults are the transport's measured ones (bench/): transfer=None is TransferOptions().
            sizes = {"part_size": self.transfer.part_size, "parts_in_flight": self.transfer.max_parts_in_flight,
                     "multipart_threshold": self.transfer.multipart_threshold}
            self._transport = self._s3_transport(storage_options, sizes)
            if self._transport is not None:
                self._transport.cancel = self.cancel
        # s3fs's cat_file HEADs an object to size a concurrent ranged read unless max_concurrency is 1:
        # manifests and log entries are small, one GET each.
        self._cat_options: dict[str, Any] = {"max_concurrency": 1} if protocol in _S3_PROTOCOLS and \
            "max_concurrency" in _parameters(getattr(self.fs, "_cat_file", None)) else {}
        if protocol in _S3_PROTOCOLS and "retries" not in (storage_options or {}).get("config_kwargs", {}):
            self.fs.retries = 1  # s3fs's own retry loop: a class attribute, so set on our private instance
        # fsspec paths (s3fs fallback, gcsfs): part / chunk sizes bound the memory of a file in flight (part
        # size x the backend's part concurrency); S3: multipart parts; GCS: resumable chunks (multiple of 256 KiB).
        part_size, parts = self.transfer.part_size, self.transfer.max_parts_in_flight
        self._put_options: dict[str, Any] = (
            {"chunksize": part_size, "max_concurrency": parts} if protocol in _S3_PROTOCOLS
            else {"chunksize": part_size} if protocol in _GCS_PROTOCOLS else {})

    def _open(self, protocol: str, storage_options: Mapping[str, Any] | None) -> tuple[Any, str]:
        """The filesystem and root path for this URL, built from its scheme (no ``url_to_fs`` chaining)."""
        location = self._location
        if location.query is not None:
            raise ConfigError(
                f"Checkpoint URL {self.url!r} has a query string. cloudckpt needs a directory URL without one: "
                "a pre-signed or SAS URL grants access to single objects, not to a directory to list and write, "
                "and an object key cannot hold '?' in a URL. Pass credentials in storage_options (s3: key/secret/"
                "token, gs: token, az: sas_token or credential) or through the environment.")
        if location.is_local:
            refuse_mistyped_url(location.raw)
        cause: BaseException | None = None
        try:
            # Under moto's in-process mock, s3:// goes through botocore, which the mock intercepts.
            cls = mock_transport(protocol) or fsspec.get_filesystem_class(protocol)
        except ImportError as exc:
            package = _BACKEND_PACKAGES.get(protocol, f"the fsspec backend for {protocol}://")
            error: Exception = ConfigError(
                f"Checkpoint URL {self.url!r} needs {package}, which is not installed ({self._redact(str(exc))}): "
                f"pip install {package}.")
            cause = sanitized_cause(exc, self._secrets)
        except ValueError:
            error = ConfigError(
                f"Unknown protocol {protocol!r} in checkpoint URL {self.url!r}. Use a local path or an fsspec URL "
                "such as s3://bucket/dir, gs://bucket/dir, memory://dir or file:///dir.")
        else:
            try:
                if location.is_local:  # a plain path: absolute, exactly as given (TF's hook does the same)
                    return cls(**dict(storage_options or {})), os.path.abspath(location.raw)
                path_url = location.without_credentials
                options = {k: v for k, v in cls._get_kwargs_from_urls(path_url).items()
                           if k not in _URL_OPTIONS_IGNORED}
                if location.userinfo is not None:
                    options["username"] = location.username
                    if location.password is not None:
                        options["password"] = location.password
                options.update(_with_single_retry_layer(protocol, storage_options, cls))
                if protocol in _S3_PROTOCOLS and cls.__module__.startswith("s3fs"):
                    _check_s3fs_options(cls, options)
                own_session = protocol in _S3_PROTOCOLS and cls.__module__.startswith("s3fs") \
                    and not {"session", "profile"} & set(options)
                if own_session:
                    options["session"] = _shared_aiobotocore_session()
                root = cls._strip_protocol(path_url)
                fs = _shared_s3fs(cls, options, own_session) if cls.__module__.startswith("s3fs") \
                    else _single_attempt_gcsfs(cls)(**options)
                return fs, (root.rstrip("/") or root)
            except (TypeError, KeyError, ValueError) as exc:
                error = ConfigError(f"Invalid storage_options or URL credentials for {self.url!r}: "
                                    f"{self._redact(_first_line(exc))}.")
                cause = sanitized_cause(exc, self._secrets)
            except Exception as exc:  # noqa: BLE001 - e.g. a backend that connects on construction (sftp)
                error = remote_error("connect to", self.url, exc, secrets=self._secrets)
                cause = sanitized_cause(exc, self._secrets)
        raise error from cause  # outside the handlers: no raw text rides along as __context__

    def _s3_transport(self, storage_options: Mapping[str, Any] | None, sizes: Mapping[str, int]
                      ) -> S3Transport | None:
        options = dict(storage_options or {})
        if self._location.userinfo is not None:
            options.setdefault("username", self._location.username)
            if self._location.password is not None:
                options.setdefault("password", self._location.password)
        try:
            return transport_for(options, **sizes)
        except ConfigError as exc:
            raise ConfigError(f"Invalid storage_options for {self.url!r}: {self._redact(str(exc))}") from None
        except Exception as exc:  # noqa: BLE001 - e.g. an unreadable AWS config profile: s3fs reports it
            log.debug("s3:// data path stays on s3fs for %s: %s", self.url, type(exc).__name__)
            return None

    def __repr__(self) -> str:
        return f"RemoteStore({self.url!r})"

    # -- naming ---------------------------------------------------------------------------
    def path(self, name: str) -> str:
        """The fsspec path of object ``name`` in this directory."""
        return posixpath.join(self.root, name)

    def cancel_transfers(self, scope: TransferScope | None = None) -> bool:
        """Set ``cancel``: retries end and no request starts; on ``s3://`` the requests in flight stop too, at
        once on a stalled connection (``S3Transport.abort_requests``). ``cancel.clear()`` undoes it for what
        follows.

        ``scope`` (from ``transfer_scope``): cancel only that scope's transfers, for good; the store's other
        transfers, and later scopes, go on. Other backends than ``s3://`` stop between requests: a file
        upload in flight there ends first, but on ``gs://`` a resumable upload (a file from 5 MiB) stops
        before its next chunk (``TransferCancelled``; gcsfs cancels its session: ``gcs_resumable``).

        A scope past its point of no return (``TransferScope.enter_commit_point``: a commit writing its commit
        point) is cancelled by neither: its requests go on.

        Returns:
            False when ``scope`` is past its point of no return (nothing was cancelled), else True.
        """
        if scope is not None:
            if not scope.cancel():
                return False
        else:
            self.cancel.set()
        if self._transport is not None:
            self._transport.abort_requests(scope)
        return True

    def transfer_scope(self) -> contextlib.AbstractContextManager[TransferScope]:
        """``with store.transfer_scope() as scope:`` -- the transfers of the block (and of the threads it
        hands work to through ``cancel.in_context``) can be cancelled on their own
        (``cancel_transfers(scope)``); ``scope`` counts the file bytes they send (``TransferScope``)."""
        return self.cancel.scope()

    def measure(self, scope: TransferScope) -> None:
        """Bring ``scope``'s figures up to date (``TransferScope.bytes_sent``: on ``s3://`` what the send queues
        of its requests in flight still hold is not delivered yet); cheap, no request."""
        if self._transport is not None:
            self._transport.measure(scope)

    def _sending(self) -> contextlib.AbstractContextManager[None]:
        """Around a whole-file upload of an fsspec backend (or a local copy): its time is sending time of the
        current scope (``TransferScope.sending``). The S3 transport times its own data-carrying requests."""
        scope = self.cancel.current() if self._transport is None else None
        return scope.sending() if scope is not None else contextlib.nullcontext()

    def _note_sent(self, local_path: str) -> None:
        """Count a file sent by an fsspec backend (the S3 transport counts as it sends) in the current scope."""
        scope = self.cancel.current()
        if scope is not None:
            try:
                scope.note_sent(os.path.getsize(local_path))
            except OSError:
                pass

    def url_of(self, name: str) -> str:
        """The user-facing URL of object ``name`` (used in messages and CheckpointInfo)."""
        return f"{self.url}/{name}"

    # -- operations -------------------------------------------------------------------------
    def check_usable(self) -> None:
        """Fail early and clearly if the directory cannot hold checkpoints.

        Raises ``ConfigError`` if the URL names a file or its bucket does not
        exist, ``RemoteError`` if the store rejects the credentials or they may
        not list the bucket (never "does not exist" for a bucket it cannot see).
        """
        def probe() -> None:
            if self.is_local or self._is_memory:
                if self.fs.isfile(self.root):
                    raise ConfigError(
                        f"checkpoint_dir {self.url!r} is a file, not a directory: point it at a directory.")
                return
            try:
                self.fs.invalidate_cache(self.root)
                self.fs.ls(self.root, detail=False)
            except FileNotFoundError as exc:  # an empty prefix, or no bucket at all
                self._raise_if_no_bucket(exc)
                bucket = self.root.split("/", 1)[0]
                # S3 answers a listing of a missing bucket NoSuchBucket: the listing found the bucket
                if self._location.scheme not in _S3_PROTOCOLS and (bucket == self.root or not self._exists(bucket)):
                    raise self._no_bucket_error() from None
                return
            if self.fs.isfile(self.root):
                raise ConfigError(
                    f"checkpoint_dir {self.url!r} is an object, not a directory: point it at a directory.")
        self._run("access", self.url, probe)
        if self.is_local:
            try:
                os.makedirs(self.root, exist_ok=True)
            except OSError as exc:
                raise ConfigError(f"Cannot create checkpoint directory {self.root!r}: {exc.strerror}.") from None

    def list_objects(self) -> list[RemoteObject]:
        """Every object directly in the directory, read fresh (listing caches are bypassed)."""
        def ls() -> list[RemoteObject]:
            self.fs.invalidate_cache(self.root)
            try:
                entries = self.fs.ls(self.root, detail=True, refresh=True) if not self.is_local \
                    else self.fs.ls(self.root, detail=True)
            except FileNotFoundError as exc:
                self._raise_if_no_bucket(exc)
                return []
            out = []
            for e in entries:
                if e.get("type") == "directory":
                    continue
                out.append(RemoteObject(posixpath.basename(e["name"].rstrip("/")), int(e.get("size") or 0),
                                        _modified_time(e), unquoted_etag(e.get("ETag")) if self.copies_parts else None,
                                        _crc32c_hex_from_metadata(e.get("crc32c"))))
            return out
        return self._run("list", self.url, ls)

    def put_file(self, local_path: str, name: str) -> None:
        """Upload a local file as ``name``. A failed upload may leave a partial object, never a manifest."""
        with self._sending():
            self._put_file(local_path, name)

    def _put_file(self, local_path: str, name: str) -> None:
        if self.is_local:
            self._run("upload", self.url_of(name), lambda: self._local_atomic_copy(local_path, self.path(name)))
        elif self._transport is not None:
            self._transfer("upload", name, lambda call, bucket, key: self._transport.put_file(
                local_path, bucket, key, call=call))
        else:
            self._run("upload", self.url_of(name),
                      lambda: self.fs.put_file(local_path, self.path(name), **self._put_options))
        if self._transport is None:
            self._note_sent(local_path)

    def get_file(self, name: str, local_path: str, progress: Callable[[int], None] | None = None, *,
                 streams: int | None = None, size: int | None = None) -> str | None:
        """Download ``name`` to ``local_path`` (streamed by the backend).

        ``progress(delta_bytes)`` is called as bytes arrive; a retried attempt
        first takes back what the failed one reported. ``streams``: concurrent
        ranged GETs for this file (S3 transport; default: its own). ``size``: its size in bytes as just
        listed, if known (the S3 transport then sends no HEAD first). Returns the
        crc32c (8 hex digits) of the bytes written to ``local_path`` when the
        backend computed it while writing them (the S3 transport), else None
        (read the file back to check it).
        """
        if self._transport is not None:
            return self._transfer("download", name, lambda call, bucket, key: self._transport.get_file_crc32c(
                bucket, key, local_path, call=call, progress=progress, ranges_in_flight=streams, size=size))[1]

        def attempt() -> None:
            callback = _ProgressCallback(progress)
            try:
                self.fs.get_file(self.path(name), local_path, callback=callback)
                callback.finish(os.path.getsize(local_path))
            except BaseException:
                callback.take_back()
                raise
        self._run("download", self.url_of(name), attempt)
        return None

    def get_files(self, files: Sequence[tuple[str, str, int]], progress: Callable[[int], None] | None = None,
                  *, streams: int) -> dict[str, str]:
        """Download several files (name, local path, size in bytes as just listed) with one pool of ``streams``
        connections (``S3Transport.get_files_crc32c``: every file's ranges in one queue, largest file first).

        Returns the crc32c (8 hex digits) of the bytes written for each file downloaded. A file the store
        holds at another size than given (replaced since the listing), or every file on a store without
        the S3 transport (the result is then {}), is left out: download it with ``get_file``.
        ``progress`` as in ``get_file``. Raises ``RemoteError`` naming the first file that failed.
        """
        if self._transport is None or not files:
            return {}
        transport = self._transport

        def download(bucket: str, keys: list[str], call: Callable[[str], Any]) -> list[tuple[int, str] | None]:
            return transport.get_files_crc32c(bucket, [(key, path, size) for key, (_, path, size) in zip(keys, files)],
                                              streams=streams, call=call, progress=progress)
        got = self._pooled("download", [name for name, _, _ in files], download)
        return {name: result[1] for (name, _, _), result in zip(files, got) if result is not None}

    def read_files_crc32c(self, files: Sequence[tuple[str, int, int | None]],
                          progress: Callable[[int], None] | None = None, *,
                          streams: int) -> dict[str, tuple[int, str, tuple[str, ...]] | None]:
        """``read_crc32c`` of several files (name, size in bytes as listed, part size or None) with one pool of
        ``streams`` connections (``S3Transport.crc32c_of_objects``), keeping no byte: per file, (bytes read,
        crc32c, per-part crc32c or ``()``), or None for a file deleted since the listing. {} on a store
        without the S3 transport: read each with ``read_crc32c``.

        Raises:
            RemoteError: a file cannot be read, or the store holds it at another size than given, naming it.
        """
        if self._transport is None or not files:
            return {}
        transport = self._transport

        def read(bucket: str, keys: list[str], call: Callable[[str], Any]) -> list[tuple[str, tuple[str, ...]] | None]:
            return transport.crc32c_of_objects(bucket, [(key, size, part) for key, (_, size, part) in zip(keys, files)],
                                               streams=streams, call=call, progress=progress)
        got = self._pooled("verify", [name for name, _, _ in files], read)
        return {name: None if result is None else (size, *result) for (name, size, _), result in zip(files, got)}

    def _pooled(self, op: str, names: Sequence[str], run: Callable[[str, list[str], Callable[[str], Any]], T]) -> T:
        """``run(bucket, keys, call)``: one transport operation over the objects ``names`` (one bucket), each
        object's requests retried by the policy through ``call(key)``, counted per object; a
        ``DownloadFailed`` becomes the ``RemoteError`` naming that object (as ``_run`` words it), a cancel
        one naming the directory."""
        self._refuse_under_mock()
        bucket = self.path(names[0]).partition("/")[0]
        keys = [self.path(name).partition("/")[2] for name in names]
        by_key = dict(zip(keys, names))
        retries = {key: [0] for key in keys}
        started = time.monotonic()
        try:
            return run(bucket, keys, lambda key: self._policy_call(op, self.url_of(by_key[key]), retries[key]))
        except DownloadFailed as exc:  # worded by _run, naming the object
            url, cause, counted = self.url_of(by_key[exc.key]), exc.__cause__ or exc, retries[exc.key]
        except Exception as exc:  # noqa: BLE001 - cancelled: no object to name, the directory is named
            url, cause, counted = self.url, exc, [sum(r[0] for r in retries.values())]

        def reraise() -> T:
            raise cause
        return self._run(op, url, reraise, retried=False, retries=counted, started=started)

    def size(self, name: str) -> int | None:
        """Size of ``name`` in bytes, or None if it does not exist."""
        def info() -> int | None:
            path = self.path(name)
            self.fs.invalidate_cache(path)
            try:
                return int(self.fs.info(path)["size"])
            except FileNotFoundError as exc:
                self._raise_if_no_bucket(exc)
                return None
        return self._run("stat", self.url_of(name), info)

    def heads(self, names: Iterable[str]) -> dict[str, dict[str, Any]]:
        """One HEAD per object ``names`` (``s3://`` through cloudckpt's transport; up to ``_HEADS_AT_ONCE`` at a
        time, each retried by the policy): per object found, its ``size`` (bytes), ``crc32c`` (the full-object
        CRC32C the store keeps, 8 hex digits, or None) and ``etag`` (without quotes, or None); missing objects
        are left out. Other stores: empty (``heads_crc32c`` is False).

        Raises:
            RemoteError: a HEAD failed after retries.
        """
        return self._heads(names)

    def _heads(self, names: Iterable[str]) -> dict[str, dict[str, Any]]:
        if self._transport is None:
            return {}
        wanted = list(dict.fromkeys(names))

        def head(name: str) -> tuple[str, dict[str, Any] | None]:
            def stat(call: Callable[[Callable[[], Any]], Any], bucket: str, key: str) -> dict[str, Any] | None:
                try:
                    return dict(call(lambda: self._transport.head(bucket, key)))
                except FileNotFoundError:
                    return None
            return name, self._transfer("stat", name, stat)
        if len(wanted) < 2:
            found = [head(name) for name in wanted]
        else:
            with ThreadPoolExecutor(max_workers=min(_HEADS_AT_ONCE, len(wanted)),
                                    thread_name_prefix="cloudckpt-head") as pool:
                found = map_all(pool, head, wanted)  # waited in slices: a Ctrl-C is seen at once
        return {name: info for name, info in found if info is not None}

    def stored_crc32c(self, names: Iterable[str] | None = None) -> dict[str, str]:
        """crc32c (8 hex digits) the store itself keeps of objects ``names`` (default: every object in the
        directory), where it keeps one; objects without one, or missing, are left out.

        Lets verification skip re-reading bytes the store has checksummed. On GCS that is each object's
        crc32c, from one listing. On S3 (through cloudckpt's transport) it is each object's full-object
        CRC32C, which cloudckpt's uploads send and the store checks on arrival: one HEAD per named object,
        up to ``_HEADS_AT_ONCE`` at a time, each retried by the policy. Other stores: empty.
        It is the figure the store computed when the object arrived, not a new reading of its bytes.
        """
        if self._transport is not None:
            wanted = list(dict.fromkeys(names)) if names is not None else [o.name for o in self.list_objects()]
            heads = self._heads(wanted)
            return {name: crc for name, head in heads.items() if (crc := head["crc32c"]) is not None}

        only = set(names) if names is not None else None

        def ls() -> dict[str, str]:
            self.fs.invalidate_cache(self.root)
            try:
                entries = self.fs.ls(self.root, detail=True)
            except FileNotFoundError as exc:
                self._raise_if_no_bucket(exc)
                return {}
            found = {}
            for e in entries:
                crc = _crc32c_hex_from_metadata(e.get("crc32c"))
                name = posixpath.basename(e["name"].rstrip("/"))
                if crc is not None and (only is None or name in only):
                    found[name] = crc
            return found
        return self._run("list", self.url, ls)

    def read_crc32c(self, name: str, size: int, *, part_size: int | None = None,
                    progress: Callable[[int], None] | None = None,
                    streams: int | None = None) -> tuple[int, str, tuple[str, ...]] | None:
        """Read object ``name`` (``size`` bytes, as listed) and checksum its bytes, keeping none of them.

        Returns (bytes read, crc32c as 8 hex digits, crc32c of each ``part_size``-byte part or ``()``
        without ``part_size``), or None if the object does not exist. On ``s3://`` through cloudckpt's
        transport the bytes come in ``streams`` parallel ranged GETs (default: the transport's), each
        retried on its own, and memory stays at ``streams x READ_BUFFER`` (1 MiB); elsewhere they are
        streamed through fsspec with a ``_STREAM_BLOCK`` read-ahead block and a failed attempt reads the
        object again.
        Transient errors are retried by the store's ``RetryPolicy`` (counted by cause, like downloads);
        ``progress(delta_bytes)`` is called as bytes arrive, and a retried attempt first takes back what the
        failed one reported.

        Raises:
            RemoteError: the object cannot be read (retries exhausted, access denied...), naming it.
        """
        if self._transport is not None:
            def read(call: Callable[[Callable[[], Any]], Any], bucket: str,
                     key: str) -> tuple[int, str, tuple[str, ...]] | None:
                try:
                    crc, parts = self._transport.crc32c_of_object(
                        bucket, key, size, part_size=part_size, call=call, progress=progress,
                        ranges_in_flight=streams)
                except FileNotFoundError:  # deleted since the listing
                    return None
                return size, crc, parts
            return self._transfer("verify", name, read)

        def attempt() -> tuple[int, str, tuple[str, ...]] | None:
            reported = [0]

            def count(n: int) -> None:
                reported[0] += n
                if progress is not None:
                    progress(n)
            try:
                with self.fs.open(self.path(name), "rb", block_size=_STREAM_BLOCK) as f:
                    if part_size:
                        return crc32c_parts_of_stream(f, part_size, count)
                    found, crc = crc32c_of_stream(f, count)
                    return found, crc, ()
            except BaseException as exc:
                if reported[0] and progress is not None:
                    progress(-reported[0])
                if isinstance(exc, FileNotFoundError):  # deleted since the listing
                    return None
                raise
        return self._run("verify", self.url_of(name), attempt)

    def read_bytes(self, name: str) -> bytes | None:
        """Whole content of a small object (manifest, state file), or None if it does not exist.

        One request on S3 (a GET; s3fs would HEAD first to size a concurrent read)."""
        def cat() -> bytes | None:
            self.fs.invalidate_cache(self.path(name))  # s3fs sizes the read from a cached listing
            try:
                return self.fs.cat_file(self.path(name), **self._cat_options)
            except FileNotFoundError as exc:
                self._raise_if_no_bucket(exc)
                return None
        return self._run("read", self.url_of(name), cat)

    def read_many(self, names: Sequence[str]) -> dict[str, bytes | None]:
        """``read_bytes`` of each of ``names`` (small objects: manifests, log entries), by name.

        On an asynchronous backend (s3fs, gcsfs) the reads go out at once in one
        ``cat`` (up to ``_READS_AT_ONCE`` in flight, one GET each); a read that
        fails there, other than a missing object, is read again by ``read_bytes``
        (retried by the policy, its error naming the object). Elsewhere, and for
        names fsspec would expand as glob patterns, one ``read_bytes`` each.

        Raises:
            RemoteError / ConfigError: as ``read_bytes``, for the first object that cannot be read.
        """
        wanted = list(dict.fromkeys(names))
        batch = [n for n in wanted if not _GLOB_CHARS.intersection(n)] \
            if getattr(self.fs, "async_impl", False) and len(wanted) > 1 else []
        found: dict[str, bytes | None] = {}
        if len(batch) > 1:
            paths = {self.path(n): n for n in batch}
            try:
                for path in paths:
                    self.fs.invalidate_cache(path)
                out = self.fs.cat(list(paths), on_error="return", batch_size=_READS_AT_ONCE, **self._cat_options)
            except Exception as exc:  # noqa: BLE001 - each object is read again below, with retries
                log.debug("Concurrent read of %d objects in %s failed (%s); reading them one by one.",
                          len(paths), self.url, describe_cause(exc))
                out = {}
            for path, data in (out.items() if isinstance(out, dict) else ()):
                name = paths.get(path)
                if name is None:
                    continue
                if isinstance(data, (bytes, bytearray)):
                    found[name] = bytes(data)
                elif isinstance(data, FileNotFoundError) and not _no_such_bucket(data):
                    found[name] = None
        for name in wanted:
            if name not in found:
                found[name] = self.read_bytes(name)
        return {name: found[name] for name in wanted}

    def open_read(self, name: str):  # noqa: ANN201 - fsspec file-like
        """Open ``name`` for streaming reads (caller closes)."""
        return self._run("open", self.url_of(name), lambda: self.fs.open(self.path(name), "rb"))

    def write_atomic(self, name: str, data: bytes) -> None:
        """Write a small object so readers see either the old or the whole new content.

        A single PUT is atomic on S3 and GCS, and an in-memory assignment on
        ``memory://``; on local disks we write a temporary file and rename it.
        """
        if self.is_local:
            def write() -> None:
                os.makedirs(self.root, exist_ok=True)
                tmp = self.path(f".{name}.tmp-{uuid.uuid4().hex}")
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, self.path(name))
            self._run("write", self.url_of(name), write)
        elif self._transport is not None:
            self._transfer("write", name, lambda call, bucket, key: self._transport.put_bytes(
                data, bucket, key, call=call))
        else:
            self._run("write", self.url_of(name), lambda: self.fs.pipe_file(self.path(name), data))

    def delete(self, names: list[str]) -> None:
        """Delete objects; missing ones are ignored. Deletes in the order given."""
        for name in names:
            def rm(name: str = name) -> None:
                try:
                    self.fs.rm_file(self.path(name))
                except FileNotFoundError:
                    pass
            self._run("delete", self.url_of(name), rm)
        self.fs.invalidate_cache(self.root)

    # -- create-only writes and bounded deletes (the multi-writer protocol, writers.py) ------------
    def write_if_absent(self, name: str, data: bytes) -> bool:
        """Create object ``name`` with ``data`` only if no object has that name; False if one exists.

        The store decides atomically (S3 ``If-None-Match: *``, GCS
        ``ifGenerationMatch=0``, a hard link on local disks, a lock in memory):
        of several writers racing for one name, exactly one gets True. Readers
        see the whole object or none. A retried attempt may find the object its
        own lost first attempt created (False), or fail after it (raises): callers
        that must know read the content back (``commitlog.CommitLog.try_append``,
        ``commit._write_manifest``).
        """
        if self.is_local:
            def fill(tmp: str) -> None:
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
            return self._run("create", self.url_of(name), lambda: _create_by_link(self.path(name), fill))
        if self._is_memory:
            def create_in_memory() -> bool:
                with _MEMORY_CREATE_LOCK:
                    if self.fs.exists(self.path(name)):
                        return False
                    self.fs.pipe_file(self.path(name), data)
                    return True
            return self._run("create", self.url_of(name), create_in_memory)

        if self._transport is not None:  # a 412 on a create-only PUT means "exists", whatever else the
            def create_with_transport(call: Callable[[Callable[[], Any]], Any], bucket: str, key: str) -> bool:
                try:  # store says (SeaweedFS omits the Condition field s3fs looks for)
                    self._transport.put_bytes(data, bucket, key, create=True, call=call)
                except FileExistsError:
                    return False
                return True
            return self._transfer("create", name, create_with_transport)

        def create_remote() -> bool:
            try:
                self.fs.pipe_file(self.path(name), data, mode="create")
            except FileExistsError:
                return False
            return True
        return self._run("create", self.url_of(name), create_remote)

    def put_file_if_absent(self, local_path: str, name: str,
                           checksums: Sequence[tuple[int, int, int]] | None = None) -> bool:
        """Upload a local file as ``name`` only if no object has that name; False if one exists.

        ``checksums``: ``(start, end, crc32c)`` covering the file, as its manifest entry records them
        (``FileEntry.checksummed_ranges``): the S3 transport sends them instead of reading the file again.

        Multipart / resumable uploads are conditional at completion (S3
        CompleteMultipartUpload with ``If-None-Match: *``; GCS
        ``ifGenerationMatch=0``). A failed upload may leave nothing or a
        partial object of its own, never replaces an existing one. In place
        (the local file already is the object) this is True. A retried attempt
        that fails (412, or any error) where an earlier attempt's answer was
        lost counts as created when the object is this upload's: through the S3
        transport ``S3Transport._holds_ours`` (one HEAD), on the fsspec backends
        ``_holds_ours`` (one ``info``: size and GCS's crc32c, or an S3 ETag
        that is the file's MD5); else it is False (a 412) or the error raised.
        """
        target = self.path(name)
        if self.is_local and os.path.abspath(local_path) == os.path.abspath(target):
            return True  # in-place mode: the Saver wrote straight into the checkpoint directory
        with self._sending():
            created = self._put_file_if_absent(local_path, name, target, checksums)
        if created and self._transport is None:  # (the transport counts the bytes as it sends them)
            self._note_sent(local_path)
        return created

    def _put_file_if_absent(self, local_path: str, name: str, target: str,
                            checksums: Sequence[tuple[int, int, int]] | None) -> bool:
        if self.is_local:
            return self._run("upload", self.url_of(name),
                             lambda: _create_by_link(target, lambda tmp: self.fs.put_file(local_path, tmp)))
        if self._is_memory:
            def create_in_memory() -> bool:
                tmp = _temporary_sibling(target)
                self.fs.put_file(local_path, tmp)  # the (slow) copy happens outside the lock
                try:
                    with _MEMORY_CREATE_LOCK:
                        if self.fs.exists(target):
                            return False
                        self.fs.mv(tmp, target)
                        return True
                finally:
                    if self.fs.exists(tmp):
                        self.fs.rm_file(tmp)
            return self._run("upload", self.url_of(name), create_in_memory)

        if self._transport is not None:
            def create_with_transport(call: Callable[[Callable[[], Any]], Any], bucket: str, key: str) -> bool:
                try:
                    self._transport.put_file(local_path, bucket, key, create=True, call=call, checksums=checksums)
                except FileExistsError:
                    return False
                return True
            return self._transfer("upload", name, create_with_transport)

        attempts = [0]

        def create_remote() -> bool:
            attempts[0] += 1
            try:
                self.fs.put_file(local_path, target, mode="create", **self._put_options)
            except TransferCancelled:
                raise
            except Exception as exc:
                if attempts[0] > 1 and self._holds_ours(local_path, target, checksums):
                    log.info("%s: a retried create-only upload failed (%s), but the store holds its bytes: the "
                             "answer to an earlier attempt was lost.", self.url_of(name), describe_cause(exc))
                    return True
                if isinstance(exc, FileExistsError):
                    return False
                raise
            return True
        return self._run("upload", self.url_of(name), create_remote)

    def _holds_ours(self, local_path: str, target: str, checksums: Sequence[tuple[int, int, int]] | None) -> bool:
        """True when ``target`` (an fsspec path) holds the bytes of ``local_path``, as a create-only upload of it
        whose answer was lost left it (the request reached the store, its answer did not; the retry then got
        412 or another error): the same size, and the store's checksum of what it holds is the file's. One
        metadata request (``fs.info``, fresh). GCS reports every object's crc32c (``crc32c``: base64 of the 4
        big-endian bytes), compared with the file's (combined from ``checksums``, the manifest's ``(start, end,
        crc32c)`` ranges, or read once more); an S3 store (the s3fs fallback) reports the ETag, the MD5 of the
        bytes of a single-request upload (not of a multipart one, "...-N", nor under SSE-KMS): compared with
        the file's MD5 (read once more). False when it cannot tell (no object, a failed request, no usable
        checksum): the caller's ordinary handling goes on."""
        try:
            size = os.path.getsize(local_path)
            self.fs.invalidate_cache(target)
            info = self.fs.info(target)
        except Exception as exc:  # noqa: BLE001 - undecided: the attempt's own error is the one to report
            log.debug("%s: looking at the object after a failed create-only upload failed: %s",
                      self._redact(target), describe_cause(exc))
            return False
        if info.get("type", "file") != "file" or info.get("size") != size:
            return False
        stored_crc = _crc32c_hex_from_metadata(info.get("crc32c"))
        if stored_crc is not None:
            if checksums:
                crc = 0  # crc32c of no bytes
                for start, end, part in checksums:
                    crc = crc32c_combine(crc, part, end - start)
                return stored_crc == f"{crc:08x}"
            try:
                return stored_crc == crc32c_of_file(local_path)[1]
            except OSError:  # the local file is gone or unreadable: undecided, the attempt's error stands
                return False
        md5 = etag_md5(info.get("ETag") or info.get("etag"))
        if md5 is None:
            return False
        try:
            return md5_of_file(local_path) == md5
        except OSError:  # as above
            return False

    @property
    def deletes_in_bulk(self) -> bool:
        """True when ``delete_before`` deletes many objects a request (S3 DeleteObjects, GCS batches)."""
        return self._bulk_deletes

    @property
    def heads_crc32c(self) -> bool:
        """True when ``stored_crc32c(names)`` asks one HEAD per name (``s3://`` through cloudckpt's transport),
        not a listing of the whole directory (GCS, whose listing carries ``RemoteObject.crc32c`` already)."""
        return self._transport is not None

    @property
    def copies_parts(self) -> bool:
        """True when uploads copy byte ranges of existing objects server-side (``s3://`` through
        cloudckpt's transport: ``UploadPartCopy``; unless ``TransferOptions.incremental`` is False);
        listings then report each object's ETag."""
        return self._transport is not None and self.transfer.incremental

    def put_file_if_absent_copying(self, local_path: str, name: str, chunks: list[tuple[int, int, int, bool]],
                                   source: str, source_etag: str, source_crc32c: str | None = None) -> int | None:
        """``put_file_if_absent``, copying the chunks marked so from object ``source`` server-side
        (``S3Transport.put_file_copying``: ``chunks`` are ``(start, end, crc32c, copy)``; ``source_etag``
        the ETag ``source`` had when it was committed, ``source_crc32c`` its manifest's crc32c). Bytes
        copied (0: all uploaded), or None when ``name`` exists. Falls back to ``put_file_if_absent``
        where parts cannot be copied.
        """
        if self._transport is None:
            return 0 if self.put_file_if_absent(local_path, name, [c[:3] for c in chunks]) else None
        source_bucket, _, source_key = self.path(source).partition("/")

        def create_with_transport(call: Callable[[Callable[[], Any]], Any], bucket: str, key: str) -> int | None:
            try:
                return self._transport.put_file_copying(local_path, bucket, key, chunks,
                                                        CopySource(source_bucket, source_key, source_etag,
                                                                   source_crc32c),
                                                        create=True, call=call)
            except FileExistsError:
                return None
        return self._transfer("upload", name, create_with_transport)

    def list_under(self, subdir: str, *, directories: bool = False) -> list[RemoteObject]:
        """Objects directly in subdirectory ``subdir`` (names relative to it), read fresh; with
        ``directories``, its subdirectories instead."""
        path = self.path(subdir)

        def ls() -> list[RemoteObject]:
            self.fs.invalidate_cache(path)
            try:
                entries = self.fs.ls(path, detail=True, refresh=True) if not self.is_local \
                    else self.fs.ls(path, detail=True)
            except (FileNotFoundError, NotADirectoryError) as exc:
                self._raise_if_no_bucket(exc)
                return []
            return [RemoteObject(posixpath.basename(e["name"].rstrip("/")), int(e.get("size") or 0),
                                 _modified_time(e)) for e in entries if (e.get("type") == "directory") == directories]
        return self._run("list", self.url_of(subdir), ls)

    def delete_before(self, names: list[str], deadline: float) -> tuple[bool, bool]:
        """Delete objects, issuing no request after ``deadline`` (``time.monotonic()``): in bulk where the
        store has a multi-object delete (S3, GCS: up to 1000 names a request), else one by one in order.

        Returns (all deleted, some attempt was retried). A retried delete is
        ambiguous: its first attempt may still reach the store later.
        """
        retried = False
        bulk = self._bulk_deletes and len(names) > 1 and not any(_GLOB_CHARS.intersection(n) for n in names)
        for batch in ([names[i:i + _BULK_DELETE_MAX] for i in range(0, len(names), _BULK_DELETE_MAX)] if bulk
                      else [[name] for name in names]):
            def rm(batch: list[str] = batch) -> None:
                if time.monotonic() >= deadline:
                    raise DeleteWindowClosed(f"delete {self.url_of(batch[0])}: the deletion window closed.",
                                             url=self.url_of(batch[0]), transient=False)
                try:
                    if len(batch) == 1:
                        self.fs.rm_file(self.path(batch[0]))
                    else:  # one request per batch (S3 DeleteObjects, a GCS batch); missing keys are no error
                        self._delete_many([self.path(n) for n in batch])
                except FileNotFoundError:
                    pass
            before = self._retries_seen
            try:
                self._run("delete", self.url_of(batch[0]), rm)
            except DeleteWindowClosed:
                self.fs.invalidate_cache(self.root)
                return False, True
            finally:
                retried = retried or self._retries_seen != before
        self.fs.invalidate_cache(self.root)
        return True, retried

    # -- internals --------------------------------------------------------------------------
    def _delete_many(self, paths: list[str]) -> None:
        """Delete ``paths`` (one bucket) in one request; a key the store did not delete raises.

        s3fs sends S3 DeleteObjects in quiet mode and drops the per-key ``Error``
        entries of its answer (HTTP 200 even when every key was refused, e.g.
        ``AccessDenied`` without ``s3:DeleteObject``: AWS S3 API reference,
        DeleteObjects), so on S3 the request is made here and its errors are
        raised as the service's own ``ClientError`` (classified by ``retry.py``).
        """
        call_s3 = getattr(self.fs, "call_s3", None)
        if call_s3 is None:  # gcsfs raises per-object failures itself
            self.fs.rm(paths)
            return
        split = [self.fs.split_path(p) for p in paths]
        out = call_s3("delete_objects", Bucket=split[0][0],
                      Delete={"Objects": [{"Key": key} for _, key, _ in split], "Quiet": True})
        errors = [e for e in out.get("Errors") or () if e.get("Code") != "NoSuchKey"]
        if errors:
            raise _delete_objects_error(errors, len(paths))

    @property
    def _is_memory(self) -> bool:
        return isinstance(self.fs, MemoryFileSystem)

    def _no_bucket_error(self) -> ConfigError:
        bucket = self.root.split("/", 1)[0]
        return ConfigError(f"Bucket {bucket!r} of checkpoint URL {self.url!r} does not exist: create it "
                           "(see terraform/) or fix the URL.")

    def _raise_if_no_bucket(self, exc: BaseException) -> None:
        """Raise ``ConfigError`` if ``exc`` (a FileNotFoundError of a listing or read) says the bucket itself
        is missing, not just the object or prefix: every entry point says so alike. S3: ``NoSuchBucket``;
        gcsfs: a 404 of the objects listing (a bucket's listing answers 404 only if there is no bucket),
        which it raises as ``FileNotFoundError("b/<bucket>/o")``."""
        if self.is_local or self._is_memory:
            return
        bucket = self.root.split("/", 1)[0]
        if _no_such_bucket(exc) or self._location.scheme in _GCS_PROTOCOLS and str(exc) == f"b/{bucket}/o":
            raise self._no_bucket_error() from None

    def _exists(self, bucket: str) -> bool:
        # Not fs.info(): that is a HeadBucket, which a prefix-restricted IAM policy (terraform/) denies.
        self.fs.invalidate_cache(bucket)
        try:
            return bool(self.fs.exists(bucket))
        except PermissionError:
            return True  # it is there; we may just not look at all of it

    def _local_atomic_copy(self, src: str, dst: str) -> None:
        if os.path.abspath(src) == os.path.abspath(dst):
            return  # in-place mode: the Saver wrote straight into the checkpoint directory
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        tmp = f"{dst}.tmp-{uuid.uuid4().hex}"
        try:
            self.fs.put_file(src, tmp)
            os.replace(tmp, dst)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def _redact(self, text: str) -> str:
        return redact(text, self._secrets)

    def _transfer(self, op: str, name: str,
                  fn: Callable[[Callable[[Callable[[], Any]], Any], str, str], T]) -> T:
        """Run a transport operation on object ``name``: each of its requests is retried by the policy
        (``fn(call, bucket, key)`` wraps them in ``call``); what escapes becomes a RemoteError."""
        url = self.url_of(name)
        self._refuse_under_mock()
        bucket, _, key = self.path(name).partition("/")
        retries = [0]
        call = self._policy_call(op, url, retries)
        return self._run(op, url, lambda: fn(call, bucket, key), retried=False, retries=retries)

    def _refuse_under_mock(self) -> None:
        if moto_mock_active():  # this store's transport was made before mock_aws started: never reach AWS
            raise bypassed_mock_error(self.fs, self.url) or ConfigError(f"{self.url}: moto's mock is active.")

    def _policy_call(self, op: str, url: str, retries: list[int]) -> Callable[[Callable[[], T]], T]:
        """``call(request)``: ``request`` retried by the policy, its retries logged, counted in ``retries[0]``
        and reported for ``op`` on ``url``; cancellable."""
        on_retry = self._retry_reporter(op, url, retries)
        return lambda request: self.retry.call(request, on_retry=on_retry, cancel=self.cancel)

    def _retry_reporter(self, op: str, url: str, retries: list[int] | None = None
                        ) -> Callable[[int, BaseException, float], None]:
        """``on_retry`` for the policy: logs, counts (``retries[0]`` too, if given) and reports the cause."""
        def on_retry(attempt: int, exc: BaseException, delay: float) -> None:
            self._retries_seen += 1
            if retries is not None:
                retries[0] += 1
            cause = describe_cause(exc)
            log.info("Retrying %s of %s after %s (attempt %d, waiting %.2fs).", op, url, cause, attempt, delay)
            if self._on_retry is not None:
                self._on_retry(cause)
        return on_retry

    def _run(self, op: str, url: str, fn: Callable[[], T], *, retried: bool = True,
             retries: list[int] | None = None, started: float | None = None) -> T:
        """Run ``fn`` with retries (unless ``retried`` is False: ``fn`` retries its own requests, counting
        them in ``retries[0]``); wrap whatever escapes in a RemoteError naming ``op`` and ``url`` (display
        form), and for a transient failure how often and how long (since ``started``, ``time.monotonic()``;
        default: now) it was retried.

        The backend's exception is kept as ``__cause__`` (a redacted stand-in if its text holds a credential).
        """
        started = time.monotonic() if started is None else started
        retries = [0] if retries is None else retries
        try:
            if self.cancel.is_set():  # given up (Ctrl-C, an abandoned upload): no request starts, on any backend
                raise TransferCancelled(f"{op} of {url} cancelled")
            if not retried:
                return fn()
            on_retry = self._retry_reporter(op, url, retries)
            if not self._resumes_chunks:
                return self.retry.call(fn, on_retry=on_retry, cancel=self.cancel)
            # gcsfs: a failed chunk of a resumable upload is resumed under the policy (gcs_resumable.py); one whose
            # retries the policy gave up on ends the operation (no new upload of the whole file)
            with retrying_chunks(ChunkRetries(self.retry, self.cancel, on_retry)) as chunks:
                return self.retry.call(fn, on_retry=on_retry, cancel=self.cancel,
                                       retry_if=lambda _: not chunks.gave_up)
        except (ConfigError, RemoteError):
            raise
        except TypeError as exc:
            if "unexpected keyword argument" in str(exc):  # backends check storage_options only when used
                error: Exception = ConfigError(f"Invalid storage_options for {self.url}: "
                                               f"{self._redact(_first_line(exc))}.")
            else:
                error = remote_error(op, url, exc, secrets=self._secrets)
            cause = sanitized_cause(exc, self._secrets)
        except Exception as exc:  # noqa: BLE001 - translated for the user, cause kept
            if describe_cause(exc) in _REJECTED_CREDENTIALS or type(exc).__name__ == "NoCredentialsError":
                _forget_s3fs(self.fs)  # the next store builds a client that resolves credentials again
            if type(exc).__name__ in _BOTOCORE_CONFIG_ERRORS and type(exc).__module__.startswith("botocore"):
                error = ConfigError(f"Invalid storage_options for {self.url}: "
                                    f"{self._redact(_first_line(exc)).rstrip('.')} (check endpoint_url, "
                                    "region_name, key and secret).")
            else:
                error = remote_error(op, url, exc, secrets=self._secrets,
                                     retried=(retries[0], time.monotonic() - started), endpoint=self._endpoint,
                                     directory=self.url)
            cause = sanitized_cause(exc, self._secrets)
        error = bypassed_mock_error(self.fs, self.url) or error  # an s3fs store opened before mock_aws started
        raise error from cause  # outside the handler: the raw exception does not ride along as __context__


def open_directory(url: str, storage_options: Mapping[str, Any] | None = None, *, retry: RetryPolicy | None = None,
                   create: bool = False, transfer: TransferOptions | None = None) -> RemoteStore:
    """The checkpoint directory at ``url``, which must exist (what the CLI and the library's commands act on).

    A remote prefix that is empty or absent in an existing bucket is an empty
    directory. ``create`` makes a missing local directory (an upload's
    target); otherwise a missing local directory is an error.

    Raises:
        ConfigError: the bucket or local directory does not exist, the URL names a file, or the URL or
            ``storage_options`` are unusable (unknown scheme, backend not installed...).
        RemoteError: the store cannot be reached or rejects the credentials.
    """
    store = RemoteStore(url, storage_options, retry=retry, transfer=transfer)
    if store.is_local:
        if os.path.isdir(store.root):
            return store
        if not create:
            raise ConfigError(f"Local directory {store.url!r} does not exist: check the path (a local path or "
                              "file:// URL is a checkpoint directory on this machine; a bucket needs its scheme, "
                              "e.g. s3://).")
    store.check_usable()
    return store


class DeleteWindowClosed(RemoteError):
    """A bounded delete (``RemoteStore.delete_before``) reached its deadline before every object was deleted."""


_MEMORY_CREATE_LOCK = threading.Lock()  # memory:// lives in this process: a lock makes create-only atomic


def _create_by_link(target: str, fill: Callable[[str], None]) -> bool:
    """Create local file ``target`` only if it does not exist: ``fill`` a temporary sibling, then hard-link
    it to ``target`` (atomic on POSIX filesystems: the link fails if the name exists). False if it existed."""
    os.makedirs(os.path.dirname(target), exist_ok=True)
    tmp = _temporary_sibling(target)
    try:
        fill(tmp)
        os.link(tmp, target)
    except FileExistsError:
        return False
    finally:
        _unlink_quietly(tmp)
    return True


def _temporary_sibling(path: str) -> str:
    """A unique hidden name next to ``path`` (same directory, so a link or move is atomic)."""
    head, tail = posixpath.split(path)
    return posixpath.join(head, f".{tail}.tmp-{uuid.uuid4().hex}")


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


_S3_PROTOCOLS = ("s3", "s3a")
_HEADS_AT_ONCE = 8  # concurrent HEADs of stored_crc32c
_READS_AT_ONCE = 32  # concurrent GETs of small objects in read_many (the client's connection pool may queue them)
# Read-ahead block of read_crc32c's fsspec reads: each request fetches one read (manifest._READ_CHUNK, 1 MiB)
# plus one block. s3fs's default block (50 MiB) cost ~110-150 MiB of RSS per file read at once; measured on
# SeaweedFS, s3fs, 3 files of 96 MiB at once, peak RSS growth: 1 MiB blocks 27 MiB, 2 MiB 32, 4 MiB 51.
_STREAM_BLOCK = 2 << 20
_GCS_PROTOCOLS = ("gs", "gcs")
_GLOB_CHARS = frozenset("*?[")  # fsspec's rm() expands these as patterns: such names are deleted one by one
_BULK_DELETE_MAX = 1000  # S3 DeleteObjects' limit (gcsfs splits into batches of 100 itself)


_STORE_SCHEMES = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "memory", "hdfs", "sftp"})


_BOTOCORE_BUCKET = re.compile(r"[a-zA-Z0-9.\-_]{1,255}")  # what botocore sends at all (legacy names included)


def _check_bucket(location: CheckpointUrl) -> None:
    """An s3:// or gs:// URL names a bucket, in characters the store's client can send (before any request)."""
    if location.scheme not in (*_S3_PROTOCOLS, *_GCS_PROTOCOLS):
        return
    bucket = location.location.split("/", 1)[0]
    if not bucket:
        raise ConfigError(f"Checkpoint URL {location.display!r} names no bucket: write "
                          f"{location.scheme}://<bucket>/<directory>.")
    if location.scheme in _S3_PROTOCOLS and not bucket.startswith("arn:") and not _BOTOCORE_BUCKET.fullmatch(bucket):
        raise ConfigError(f"Bucket {bucket!r} of checkpoint URL {location.display!r} is not a valid S3 bucket name: "
                          "use 3 to 63 lower-case letters, digits, '.' and '-' (a ':' ahead of the bucket is "
                          "user:password@, which needs an '@').")


def refuse_mistyped_url(path: str) -> None:
    """``s3:/bucket/run`` or ``gs:bucket/run`` is a URL with a slash missing, not a local directory to fill."""
    scheme, colon, rest = path.partition(":")
    if colon and scheme.lower() in _STORE_SCHEMES and not rest.startswith("//"):
        fixed = display_url(f"{scheme}://{rest.lstrip('/')}")  # credentials masked
        raise ConfigError(
            f"Checkpoint directory {fixed!r} is written with a slash missing ({scheme!r} followed by ':' or ':/' "
            f"instead of '://'), which would make it a local directory. Write it with '://', or start a local "
            "path with './'.")


# botocore's errors for options it cannot use (raised at the first request, not when s3fs is created): the
# user's configuration, so ConfigError (CLI exit 2), not a store failure.
_BOTOCORE_CONFIG_ERRORS = frozenset({"InvalidRegionError", "NoRegionError", "EndpointResolutionError",
                                     "PartialCredentialsError", "InvalidEndpointConfigurationError",
                                     "InvalidS3AddressingStyleError", "InvalidConfigError"})
# Answers of a store that rejected the credentials (``describe_cause``): remote_error's hint, and a shared s3fs
# client no longer handed out (``_forget_s3fs``).
_REJECTED_CREDENTIALS = frozenset({"InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken",
                                   "HTTP 401"})
# aiobotocore sessions by the hash of what their default credential chain reads (see _shared_aiobotocore_session),
# and the one loader of botocore's service models they share (by AWS_DATA_PATH, where it looks for them).
_AIO_SESSION: ProcessCache[Any] = ProcessCache(4)
_AIO_LOADER: ProcessCache[Any] = ProcessCache(1)
# s3fs filesystems by their options' token (see _shared_s3fs); 16 distinct options (endpoints, credentials)
# kept: a program uses one or two.
_S3FS: ProcessCache[Any] = ProcessCache(16)


# fsspec's own keyword arguments, accepted by every filesystem class (``AbstractFileSystem``).
_FSSPEC_OPTIONS = frozenset({"skip_instance_cache", "use_listings_cache", "listings_expiry_time", "max_paths",
                             "loop", "asynchronous", "batch_size"})


def _check_s3fs_options(cls: type, options: Mapping[str, Any]) -> None:
    """s3fs passes unknown options on to botocore's client only when it first connects (and cloudckpt's
    own transport may never connect through it): refuse them up front, as that client would.

    Raises:
        TypeError: an option s3fs does not take (the caller reports it as a ``ConfigError``).
    """
    import inspect  # noqa: PLC0415

    import aiobotocore.session  # noqa: PLC0415 - s3fs's own dependency

    # s3fs hands the rest to the aiobotocore session it creates (profile...)
    known = (set(inspect.signature(cls.__init__).parameters) | _FSSPEC_OPTIONS
             | set(inspect.signature(aiobotocore.session.AioSession.__init__).parameters)) - {"self", "kwargs"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise TypeError(f"unknown s3fs option(s) {', '.join(unknown)} (see s3fs.S3FileSystem's arguments)")


def _parameters(fn: Any) -> frozenset[str]:
    """The parameter names of ``fn`` (empty when it is None or has no signature)."""
    import inspect  # noqa: PLC0415

    try:
        return frozenset(inspect.signature(fn).parameters) if fn is not None else frozenset()
    except (TypeError, ValueError):
        return frozenset()


def _shared_aiobotocore_session() -> Any:
    """The aiobotocore session the s3fs stores of this process share (unless given a profile or session) while
    the ``AWS_*`` environment and the shared config and credentials files stay the same (``aws_environment``).

    A fresh session parses botocore's S3 service model again for its first client: 0.2-0.5 CPU-seconds per
    store on the bench machine, paid by every ``download_checkpoint``; sessions here share one loader, which
    parses it once. A session keeps the default chain's credentials once resolved (its first client without
    keys of its own): a session per environment, so keys rotated in the environment or the files reach new
    stores, and one whose credentials were refused is forgotten with its client (``_forget_s3fs``).
    """
    import hashlib

    import aiobotocore.session

    def build() -> Any:
        session = aiobotocore.session.AioSession()
        loader = _AIO_LOADER.get(hashlib.sha256(repr(os.environ.get("AWS_DATA_PATH")).encode()).hexdigest(),
                                 lambda: session.get_component("data_loader"))
        session.register_component("data_loader", loader)
        return session

    return _AIO_SESSION.get(hashlib.sha256(repr(aws_environment()).encode()).hexdigest(), build)


def _check_s3_key_pair(storage_options: Mapping[str, Any] | None, url: str) -> None:
    """Refuse an S3 access key without its secret, or a secret without its key (``key``/``secret``,
    ``username``/``password`` or ``client_kwargs`` ``aws_access_key_id``/``aws_secret_access_key``):
    botocore would fail only at the first request (``PartialCredentialsError``), as a store error.

    Raises:
        ConfigError: naming which of the two is missing (never a value).
    """
    options = storage_options or {}
    client = options.get("client_kwargs") or {}
    key = options.get("key") or options.get("username") or client.get("aws_access_key_id")
    secret = options.get("secret") or options.get("password") or client.get("aws_secret_access_key")
    if bool(key) != bool(secret):
        have, missing = ("an access key (key)", "secret") if key else ("a secret", "access key (key)")
        raise ConfigError(f"storage_options for {url!r} give {have} without its {missing}: pass both (and token "
                          "for temporary credentials), or neither to use the environment's credentials.")


def _shared_s3fs(cls: type, options: Mapping[str, Any], own_session: bool = False) -> Any:
    """The s3fs filesystem for ``options`` that every ``RemoteStore`` of this process with the same options
    shares (``options`` keep ``skip_instance_cache``: cloudckpt's instances are never fsspec's shared ones,
    whose settings it would change, see ``_with_single_retry_layer``).

    A new s3fs instance builds its aiobotocore client on its first request: 30-50 ms (bench machine,
    SeaweedFS on 127.0.0.1), a third of what ``download_checkpoint`` of a small checkpoint took when each
    store had an instance of its own, against ~2 ms for a listing on a used one. Keyed by fsspec's token
    of the class and options and by the ``AWS_*`` environment (endpoint, region, credentials: a change
    gives new stores a new instance), hashed: no credential is kept in a key. The 16 most
    recently used are kept; an instance whose request failed for want of valid credentials is dropped
    (``_forget_s3fs``: its client keeps what it resolved, or not, at its first request); cleared in a
    forked child, whose copy of the parent's client cannot be used (as fsspec's own instance cache does).
    Options holding anything but plain data (an event ``loop``, a user's ``session``, a callable) are not
    shared: a token is made of their text, and two event loops print alike. ``own_session``: the ``session``
    option is cloudckpt's (``_shared_aiobotocore_session``), not the user's.
    """
    from fsspec.utils import tokenize

    if not _plain_data({k: v for k, v in options.items() if not (own_session and k == "session")}):
        return cls(**options)
    key = tokenize(cls, sorted(options.items(), key=lambda kv: kv[0]), aws_environment())
    return _S3FS.get(key, lambda: cls(**options))


def _plain_data(value: Any) -> bool:
    """True for None, bools, numbers, strings, bytes and dicts, lists and tuples of them: what a token made
    of the text (fsspec's ``tokenize``) tells apart."""
    if value is None or isinstance(value, (bool, int, float, str, bytes)):
        return True
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain_data(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return all(_plain_data(v) for v in value)
    return False


def _forget_s3fs(fs: Any) -> None:
    """Stop handing ``fs`` to new stores (see ``_shared_s3fs``), nor its aiobotocore session, which keeps the
    credentials it resolved; stores using them keep them."""
    _S3FS.forget(fs)
    session = getattr(fs, "session", None)
    if session is not None:
        _AIO_SESSION.forget(session)
    forget_sessions()  # the transports' botocore sessions keep what they resolved too


def _with_single_retry_layer(protocol: str, storage_options: Mapping[str, Any] | None, cls: type) -> dict[str, Any]:
    """fsspec options with cloudckpt's RetryPolicy as the only retry layer for S3 and GCS, and requests that
    end when the store stops answering.

    botocore (5 attempts) and s3fs (5 more, for some errors) would otherwise
    retry underneath our policy, multiplying waits, hiding retries from the
    stats and stretching deadlines. A user who sets ``config_kwargs.retries``
    keeps theirs. The instance is private (not fsspec's shared cache) because
    we change its settings.

    gcsfs (``cls``) takes no option for the retry loop of its requests (``_single_attempt_gcsfs`` removes
    it); what it takes: ``requests_timeout``, the per-request timeout it hands aiohttp, whose default (None)
    is no timeout at all (a store that accepts the connection and never answers holds the request, and the
    training's commit, forever): here ``_CONNECT_TIMEOUT`` to connect and ``_READ_TIMEOUT`` between bytes
    of an answer, as botocore's for S3 (a number given is aiohttp's ``total`` per request). Its
    ``ExtendedGcsFileSystem`` (gcsfs's default unless ``GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false``) also
    probes each bucket's layout over gRPC, retried for 60 s (``retry_timeout``) before it falls back to
    the JSON API: one attempt here (``retry_timeout=0``; not cached when it fails, the next operation
    probes again). A user's own ``requests_timeout`` / ``retry_timeout`` is kept.
    """
    options = dict(storage_options or {})
    if protocol in _S3_PROTOCOLS:
        config = dict(options.get("config_kwargs") or {})
        config.setdefault("retries", {"total_max_attempts": 1})
        config.setdefault("connect_timeout", _CONNECT_TIMEOUT)
        options["config_kwargs"] = config
        options.setdefault("skip_instance_cache", True)
    elif protocol in _GCS_PROTOCOLS and _gcsfs_class(cls) is not None:
        import aiohttp  # noqa: PLC0415 - gcsfs's own dependency

        options.setdefault("requests_timeout", aiohttp.ClientTimeout(sock_connect=_CONNECT_TIMEOUT,
                                                                     sock_read=_READ_TIMEOUT))
        extended = sys.modules.get("gcsfs.extended_gcsfs")
        if extended is not None and issubclass(cls, extended.ExtendedGcsFileSystem):
            options.setdefault("retry_timeout", 0)
        options.setdefault("skip_instance_cache", True)
    return options


# Seconds to open a connection to the store, and to wait for its next bytes once a request is sent (botocore's
# connect_timeout, set for s3fs, and its default read_timeout; aiohttp's sock_connect and sock_read for gcsfs).
_CONNECT_TIMEOUT = 10
_READ_TIMEOUT = 60
# gcsfs's coroutines wrapped in its retry loop (``@retry_request(retries=6)``, gcsfs 2024-2026.x).
_GCSFS_RETRIED = ("_request", "_get_file_request", "_get_file_concurrent")


def _gcsfs_class(cls: type) -> type | None:
    """gcsfs's ``GCSFileSystem`` (core) if ``cls`` is it or a subclass of it, else None."""
    core = sys.modules.get("gcsfs.core")
    base = getattr(core, "GCSFileSystem", None)
    return base if isinstance(base, type) and issubclass(cls, base) else None


_SINGLE_ATTEMPT_GCSFS: dict[type, type] = {}
_RESUMING_GCSFS: set[type] = set()  # the classes _single_attempt_gcsfs made (their chunks are resumed)
_SINGLE_ATTEMPT_GCSFS_LOCK = threading.Lock()


def _single_attempt_gcsfs(cls: type) -> type:
    """``cls`` (a gcsfs filesystem class) with each request sent once: cloudckpt's ``RetryPolicy`` is the one
    retry layer on ``gs://``, as on ``s3://``; any other class as it is.

    gcsfs wraps its requests (``_request``, under every JSON API call, and downloads' ``_get_file_request``
    and ``_get_file_concurrent``, the latter around the former) in ``gcsfs.retry.retry_request``: 6 attempts
    with 1, 2, 4, 8, 16 s (+ jitter) between them, ~35 s per failing request (x6 more for a download),
    and each failed request logged with its traceback at ERROR. Under the policy's attempts an unreachable
    store took ~5 minutes to fail (the policy's deadline) and logged a traceback per attempt; the policy's
    counts by cause and its cancellation never saw gcsfs's retries. gcsfs has no option for it: the count
    is bound when the class is defined (``@retry_request(retries=retries)``), so neither a constructor
    argument nor ``fs.retries`` changes it.

    So cloudckpt's instances are of a subclass whose three methods are gcsfs's own undecorated coroutines
    (``__wrapped__``, kept by the ``decorator`` package gcsfs uses): the same requests, sent once, their
    errors raised as they are, for the policy to retry what gcsfs's ``is_retriable`` did (``retry.py``:
    5xx, 408, 429, connection errors and timeouts, a download's ``ChecksumError``, google-auth errors marked
    retryable), but 501 and a 401, which are final. Not a patch of gcsfs's class (other users of gcsfs in
    the process keep its retries) nor of an instance: gcsfs's ``ExtendedGcsFileSystem`` overrides the
    download methods and calls the core ones through ``super()``, which an instance attribute would not
    reach, so for a subclass of the core class the single-attempt methods go between it and the core class
    in the MRO. A gcsfs whose methods carry no ``__wrapped__`` (no retry loop, or another one) is used as
    it is. The classes are made once per gcsfs class.

    One request is retried, by the policy, on its own: a chunk of a resumable upload, resumed where the
    session stands (``gcs_resumable.resuming_chunks``), so that a 503 in the middle of a large file re-sends
    one chunk, not the file; the session's initiation, like every other request, is sent once.
    """
    base = _gcsfs_class(cls)
    if base is None:
        return cls
    with _SINGLE_ATTEMPT_GCSFS_LOCK:
        if cls in _SINGLE_ATTEMPT_GCSFS:
            return _SINGLE_ATTEMPT_GCSFS[cls]
        undecorated = {name: getattr(base.__dict__.get(name), "__wrapped__", None) for name in _GCSFS_RETRIED}
        if any(fn is None for fn in undecorated.values()):
            log.debug("gcsfs %s: no retry loop found around its requests; its filesystem is used as it is.",
                      getattr(sys.modules.get("gcsfs"), "__version__", "?"))
            single = cls
        else:
            undecorated["_request"] = resuming_chunks(undecorated["_request"])
            single = _subclass(base, (base,), undecorated)
            if cls is not base:  # MRO: cls, ..., SingleAttemptGCSFileSystem, GCSFileSystem
                single = _subclass(cls, (cls, single), {})
            _RESUMING_GCSFS.add(single)
        _SINGLE_ATTEMPT_GCSFS[cls] = single
        return single


def _subclass(of: type, bases: tuple[type, ...], methods: Mapping[str, Any]) -> type:
    """``SingleAttempt<of's name>``, of ``bases``, with ``methods``: made by ``types.new_class``, so that
    fsspec's metaclass (``_Cached``: its instance cache) initialises it as for a class statement."""
    name = f"SingleAttempt{of.__name__}"
    return types.new_class(name, bases, exec_body=lambda namespace: namespace.update(
        methods, __module__=__name__, __qualname__=name, __doc__=of.__doc__))


def remote_error(op: str, url: str, exc: BaseException, *, secrets: tuple[str, ...] = (),
                 retried: tuple[int, float] | None = None, endpoint: str | None = None,
                 directory: str | None = None) -> RemoteError:
    """Build a RemoteError that says what failed, where, why and what to do.

    ``url`` and the backend's text are redacted (``cloudckpt.urls.redact``, plus the literal ``secrets``);
    the caller chains the cause through ``sanitized_cause``. ``retried``: (retries, seconds) the operation
    spent, said for a transient failure; ``endpoint``: the store's endpoint_url (display form), named when
    it could not be reached; ``directory``: the checkpoint directory, named when permission is missing.
    """
    transient = is_transient(exc)
    cause = describe_cause(exc)
    text = _ERRNO_PREFIX.sub("", redact(_first_line(exc), secrets)) if str(exc).strip() else cause
    url = redact(url, secrets)
    where = redact(directory, secrets) if directory else url
    local = local_disk_errno(exc)
    if local is not None:  # this machine's disk, not the store: no permission or retry would help
        hint = LOCAL_DISK_HINTS[local]
    elif cause in _REJECTED_CREDENTIALS:
        hint = ("the store rejected the credentials; check the environment credentials or the key, secret "
                "or token in storage_options")
    elif cause in ("AccessDenied", "HTTP 403") or isinstance(exc, PermissionError) or text.startswith("Forbidden"):
        permission = _PERMISSION_OF.get(op, "access")
        if url.startswith(("s3://", "s3a://")):
            permission = _S3_ACTION_OF.get(op, permission)
        hint = (f"the credentials lack {permission} permission on {where}, or the store rejected them: grant "
                "it (see terraform/) or use credentials that have it")
    elif cause == "NoSuchBucket":
        hint = "the bucket does not exist; create it or fix the URL"
    elif cause == "NotImplemented":
        hint = ("the store does not implement this request" + (
            ": a create-only write needs conditional writes (If-None-Match), which cloudckpt's commit "
            "protocol relies on; use a store that supports them" if op in ("create", "upload") else ""))
    elif type(exc).__name__ == "TransferCancelled":  # s3_transport's: its transfers were cancelled on purpose
        # (before "transient": a request cut by the cancel carries the socket's error as its cause)
        hint = ("cancelled on purpose: an interrupt, a close, a preemption deadline or a preemption's final "
                "checkpoint abandoned the transfer")
    elif cause == "AttemptTimedOut":  # retry.py's: a request in flight cut when the policy's deadline passed
        hint = ("the store accepted a request and did not answer it before the retry policy's deadline passed: "
                "it stalled or is overloaded; try again later, or give the RetryPolicy a longer deadline")
    elif transient:
        spent = "" if retried is None else \
            f"; retried {retried[0]} time{'s' if retried[0] != 1 else ''} over {retried[1]:.0f} s"
        if is_connection_failure(exc):
            hint = (f"the store could not be reached{f' at {endpoint}' if endpoint else ''}{spent}: check "
                    "endpoint_url (storage_options) and that the store is running and reachable")
        else:
            hint = (f"the store kept failing or throttling{spent}: try again later, or give the RetryPolicy "
                    "more attempts or a longer deadline")
    else:
        hint = f"cause: {type(exc).__name__}; {DEBUG_HINT}"
    lead = text if text.startswith(cause) else f"{cause}: {text}"
    return RemoteError(f"{op} {url} failed: {lead} ({hint}).", url=url, transient=transient)


LOCAL_DISK_HINTS = {
    errno.ENOSPC: "the local disk is full: free space on it, or use a directory on a disk with room",
    errno.EDQUOT: "this user's disk quota is exhausted: free space, or use a directory with room",
    errno.EROFS: "the local file system is read-only: use a directory on a writable file system",
    errno.EFBIG: "the file is larger than the local file system or this process's file size limit (ulimit -f) "
                 "allows: use a directory on a file system that takes files this large, or raise the limit",
}


def local_disk_errno(exc: BaseException) -> int | None:
    """The errno of a local disk failure (full, over quota, read-only) in ``exc`` or its causes, else None."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in LOCAL_DISK_HINTS:
            return current.errno
        current = current.__cause__ or current.__context__
    return None


_ERRNO_PREFIX = re.compile(r"^(?:\[Errno -?\d+\] )+")  # OSError's text, once per wrapping layer
# What each operation of RemoteStore needs, generally and as the S3 IAM action.
_PERMISSION_OF = {"access": "list", "list": "list", "read": "read", "download": "read", "stat": "read",
                  "open": "read", "create": "write", "upload": "write", "write": "write", "delete": "delete"}
_S3_ACTION_OF = {"access": "s3:ListBucket", "list": "s3:ListBucket", "read": "s3:GetObject",
                 "download": "s3:GetObject", "stat": "s3:GetObject", "open": "s3:GetObject",
                 "create": "s3:PutObject", "upload": "s3:PutObject", "write": "s3:PutObject",
                 "delete": "s3:DeleteObject"}


def _no_such_bucket(exc: BaseException) -> bool:
    """True if a backend error says that the bucket does not exist (S3's NoSuchBucket, in the cause chain)."""
    return describe_cause(exc) == "NoSuchBucket"


def _raw_endpoint(storage_options: Mapping[str, Any] | None) -> str | None:
    """The endpoint URL ``storage_options`` name (s3fs: ``endpoint_url`` or ``client_kwargs``), as given."""
    options = storage_options or {}
    client_kwargs = options.get("client_kwargs")
    endpoint = options.get("endpoint_url") or (client_kwargs.get("endpoint_url")
                                               if isinstance(client_kwargs, Mapping) else None)
    return endpoint if isinstance(endpoint, str) and endpoint else None


def _endpoint_of(storage_options: Mapping[str, Any] | None, secrets: tuple[str, ...]) -> str | None:
    """The endpoint URL ``storage_options`` name, display form (see ``_raw_endpoint``)."""
    endpoint = _raw_endpoint(storage_options)
    return None if endpoint is None else redact(display_url(endpoint), secrets)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class _ProgressCallback(fsspec.callbacks.Callback):
    """Forwards fsspec's absolute progress as byte deltas to ``report``."""

    def __init__(self, report: Callable[[int], None] | None) -> None:
        super().__init__()
        self._report = report
        self._reported = 0

    def call(self, *args: Any, **kwargs: Any) -> None:
        delta = int(self.value or 0) - self._reported
        if delta > 0 and self._report is not None:
            self._reported += delta
            self._report(delta)

    def finish(self, size: int) -> None:
        """The transfer is done: report what the backend did not (fsspec's local ``get_file`` calls no
        callback at all) up to ``size`` bytes."""
        if size > self._reported and self._report is not None:
            self._report(size - self._reported)
            self._reported = size

    def take_back(self) -> None:
        if self._reported and self._report is not None:
            self._report(-self._reported)
        self._reported = 0


_S3_ERROR_STATUS = {"AccessDenied": 403, "InternalError": 500, "SlowDown": 503, "ServiceUnavailable": 503}


def _delete_objects_error(errors: list[Mapping[str, Any]], count: int) -> Exception:
    """A botocore ``ClientError`` for the per-key ``Error`` entries of a DeleteObjects answer (status from the
    first entry's code, so that throttling and server errors stay transient and AccessDenied is final)."""
    from botocore.exceptions import ClientError

    first = errors[0]
    code = str(first.get("Code") or "InternalError")
    message = (f"{len(errors)} of {count} keys were not deleted, first {first.get('Key')!r}: "
               f"{first.get('Message') or code}")
    return ClientError({"Error": {"Code": code, "Message": message},
                        "ResponseMetadata": {"HTTPStatusCode": _S3_ERROR_STATUS.get(code, 400)}}, "DeleteObjects")


def _crc32c_hex_from_metadata(value: Any) -> str | None:
    """GCS reports crc32c as base64 of the 4 big-endian bytes (S3's header form); the manifest uses 8 hex digits."""
    return crc32c_hex_from_header(value) if isinstance(value, str) else None


def _modified_time(entry: Mapping[str, Any]) -> float | None:
    for key in ("mtime", "LastModified", "updated", "created", "timeCreated"):
        value = entry.get(key)
        if value is None:
            continue
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, _dt.datetime):
            return value.timestamp()
        if isinstance(value, str):
            try:
                return _dt.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
            except ValueError:
                continue
    return None
