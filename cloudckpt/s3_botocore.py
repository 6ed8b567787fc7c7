"""A small synchronous S3 filesystem on botocore: the transport moto's in-process mock intercepts.

``BotocoreS3FileSystem`` implements the fsspec operations ``RemoteStore``
uses, no more: ``ls`` (with detail), ``info``, ``exists``, ``isfile``,
``put_file`` (one PUT below two parts, else a multipart upload),
``get_file`` (streamed, with fsspec's progress callback), ``cat_file``,
``open(path, "rb")``, ``pipe_file``, ``rm_file``, ``invalidate_cache`` (a
no-op: it keeps no listing cache). ``pipe_file`` and ``put_file`` accept
fsspec's ``mode="create"``: the PUT or CompleteMultipartUpload carries
``If-None-Match: *`` and the store refuses to replace an existing object
(``FileExistsError``), as with s3fs.

Errors are translated by s3fs's own ``translate_boto_error`` (NoSuchKey/404 ->
``FileNotFoundError``, AccessDenied/403 -> ``PermissionError``, a failed
``If-None-Match`` -> ``FileExistsError``...), the botocore ``ClientError``
kept as ``__cause__``, so ``cloudckpt.retry`` classifies and labels every
failure exactly as it does with s3fs.

``cloudckpt.moto_mock.mock_transport`` selects it while ``moto.mock_aws`` is
active; it is not registered with fsspec. A filesystem created under the mock
for AWS's own endpoint refuses to send anything once the mock has ended
(``ConfigError``), so a test never reaches real AWS.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from typing import Any, Callable, Iterable, Mapping
from urllib.parse import urlsplit

import botocore.config
import botocore.session
from botocore import UNSIGNED
from botocore.exceptions import ClientError
from fsspec.callbacks import DEFAULT_CALLBACK, Callback
from fsspec.spec import AbstractBufferedFile, AbstractFileSystem

from .errors import ConfigError
from .moto_mock import MOCK_FIX, moto_mock_active

__all__ = ["BotocoreS3FileSystem", "DEFAULT_PART_SIZE"]

log = logging.getLogger("cloudckpt")

DEFAULT_PART_SIZE = 8 << 20  # RemoteStore passes TransferOptions.part_size as chunksize
_MAX_PARTS = 10_000  # S3's limit on the parts of one multipart upload
_MAX_PUT = 5 << 30  # S3's limit on one PutObject, bytes
_READ_CHUNK = 1 << 20
# s3fs options that tune only s3fs's own caching and concurrency: meaningless here, accepted and ignored.
_IGNORED_OPTIONS = frozenset({
    "use_listings_cache", "listings_expiry_time", "max_paths", "default_block_size", "default_fill_cache",
    "default_cache_type", "max_concurrency", "fixed_upload_size", "cache_regions", "skip_instance_cache",
})
# s3fs options accepted only at their default value (anything else changes behaviour we do not provide).
_DEFAULT_ONLY_OPTIONS = {"version_aware": False, "asynchronous": False, "loop": None, "session": None}


class BotocoreS3FileSystem(AbstractFileSystem):
    """S3 through a synchronous botocore client, taking s3fs's storage_options.

    Args:
        key, secret, token: credentials (default: botocore's usual chain; under
            moto's mock, its fake environment credentials).
        username, password: a URL's userinfo; as in s3fs, the key and secret.
        anon: send unsigned requests.
        endpoint_url: the S3 endpoint (also ``client_kwargs["endpoint_url"]``
            or botocore's ``AWS_ENDPOINT_URL``); default: AWS's.
        profile: an AWS config profile.
        client_kwargs: keyword arguments for ``create_client`` (``region_name``,
            ``verify``...).
        config_kwargs: keyword arguments for ``botocore.config.Config``
            (``retries``, ``connect_timeout``...).
        s3_additional_kwargs: parameters added to every call whose operation
            takes them (``ServerSideEncryption``, ``SSEKMSKeyId``, ``ACL``...).
        requester_pays: send ``RequestPayer=requester``.
        use_ssl: use HTTPS to the endpoint.

    s3fs's caching and concurrency options are accepted and ignored.

    Raises:
        ConfigError: an option this filesystem cannot honour (``version_aware``,
            ``asynchronous``, an aiobotocore ``session``, unknown names); the
            message names the options, never their values.
    """

    protocol = ("s3", "s3a")
    root_marker = ""
    cachable = False  # every RemoteStore gets its own client; no shared state to go stale

    def __init__(
        self,
        key: str | None = None,
        secret: str | None = None,
        token: str | None = None,
        username: str | None = None,
        password: str | None = None,
        anon: bool = False,
        endpoint_url: str | None = None,
        profile: str | None = None,
        client_kwargs: Mapping[str, Any] | None = None,
        config_kwargs: Mapping[str, Any] | None = None,
        s3_additional_kwargs: Mapping[str, Any] | None = None,
        requester_pays: bool = False,
        use_ssl: bool = True,
        **options: Any,
    ) -> None:
        unsupported = sorted(name for name, value in options.items() if name not in _IGNORED_OPTIONS
                             and (name not in _DEFAULT_ONLY_OPTIONS or value != _DEFAULT_ONLY_OPTIONS[name]))
        if unsupported:
            raise ConfigError(
                f"storage_options {unsupported} cannot be honoured while moto's mock_aws is active (cloudckpt then "
                f"talks to S3 through plain botocore, which the mock intercepts): drop them in the test, {MOCK_FIX}")
        super().__init__()
        client_args: dict[str, Any] = dict(client_kwargs or {})
        if endpoint_url is not None:
            client_args.setdefault("endpoint_url", endpoint_url)
        for name, value in (("aws_access_key_id", key or username), ("aws_secret_access_key", secret or password),
                            ("aws_session_token", token)):
            if value is not None:
                client_args.setdefault(name, value)
        config = botocore.config.Config(**dict(config_kwargs or {}))
        if anon:
            config = config.merge(botocore.config.Config(signature_version=UNSIGNED))
        if client_args.get("config") is not None:
            config = config.merge(client_args["config"])
        client_args["config"] = config
        client_args.setdefault("use_ssl", use_ssl)
        session = botocore.session.Session(profile=profile)
        self._client = session.create_client("s3", **client_args)
        self._extra = dict(s3_additional_kwargs or {})
        if requester_pays:
            self._extra.setdefault("RequestPayer", "requester")
        host = urlsplit(self._client.meta.endpoint_url).hostname or ""
        aws = host == "amazonaws.com" or host.endswith(".amazonaws.com")
        if moto_mock_active() and not aws and host not in ("127.0.0.1", "localhost", "::1"):
            # moto's mock only answers for AWS's own hosts: anything else would leave the machine.
            raise ConfigError(
                f"endpoint_url host {host!r} under moto's in-process mock: the mock answers only for AWS "
                "endpoints, so these requests would go to that host. Drop endpoint_url inside mock_aws, or use "
                "the cloudckpt_s3 fixture (moto's server on 127.0.0.1) with its storage_options.")
        # Only the mock stands between this client and AWS itself: never send without it.
        self._needs_mock = moto_mock_active() and aws

    # -- plumbing ---------------------------------------------------------------------------
    @staticmethod
    def split_path(path: str) -> tuple[str, str]:
        """(bucket, key) of ``bucket/key`` or an ``s3://`` URL; key is "" for a bucket."""
        bucket, _, key = BotocoreS3FileSystem._strip_protocol(path).partition("/")
        return bucket, key

    def _call(self, operation: str, **params: Any) -> Any:
        """One S3 API call, with ``s3_additional_kwargs`` its operation takes; ClientError -> builtin OSError."""
        if self._needs_mock and not moto_mock_active():
            raise ConfigError(
                f"moto's mock_aws() ended while cloudckpt was still using S3 through it (bucket "
                f"{params.get('Bucket')!r}); nothing was sent to AWS. Keep training and the hook's end() (or the "
                f"cloudckpt call) inside the mock, {MOCK_FIX}.")
        if self._extra:
            api = self._client.meta.method_to_api_mapping[operation]
            members = self._client.meta.service_model.operation_model(api).input_shape.members
            params = {**{k: v for k, v in self._extra.items() if k in members}, **params}
        try:
            return getattr(self._client, operation)(**params)
        except ClientError as exc:
            from s3fs.errors import translate_boto_error  # the same mapping as s3fs's, by construction

            raise translate_boto_error(exc, set_cause=False) from exc

    # -- reading ----------------------------------------------------------------------------
    def ls(self, path: str, detail: bool = True, **kwargs: Any) -> list[Any]:
        """Objects and common prefixes directly under ``path``; a file's own entry if ``path`` is one.

        Raises:
            FileNotFoundError: nothing at or under ``path``, or no such bucket.
        """
        bucket, key = self.split_path(path)
        prefix = f"{key}/" if key else ""
        entries: list[dict[str, Any]] = []
        params: dict[str, Any] = {"Bucket": bucket, "Prefix": prefix, "Delimiter": "/"}
        while True:
            page = self._call("list_objects_v2", **params)
            entries += [_directory(f"{bucket}/{p['Prefix'].rstrip('/')}") for p in page.get("CommonPrefixes", [])]
            entries += [_file(f"{bucket}/{o['Key']}", o["Size"], o.get("LastModified"), o.get("ETag"))
                        for o in page.get("Contents", []) if o["Key"] != prefix]
            if not page.get("IsTruncated"):
                break
            params["ContinuationToken"] = page["NextContinuationToken"]
        if not entries and key:
            entries = [self.info(path)]  # a file, or FileNotFoundError
        return entries if detail else [e["name"] for e in entries]

    def info(self, path: str, **kwargs: Any) -> dict[str, Any]:
        """``name``, ``size``, ``type`` (file / directory) and, for files, ``LastModified`` and ``ETag``.

        A bucket is checked by listing one key (a prefix-restricted IAM policy
        may deny HeadBucket). Raises ``FileNotFoundError`` if nothing is there.
        """
        bucket, key = self.split_path(path)
        if not key:
            self._call("list_objects_v2", Bucket=bucket, MaxKeys=1)
            return _directory(bucket)
        try:
            head = self._call("head_object", Bucket=bucket, Key=key)
            return _file(f"{bucket}/{key}", head["ContentLength"], head.get("LastModified"), head.get("ETag"))
        except FileNotFoundError:
            page = self._call("list_objects_v2", Bucket=bucket, Prefix=f"{key.rstrip('/')}/", MaxKeys=1)
            if page.get("KeyCount") or page.get("Contents"):
                return _directory(f"{bucket}/{key}")
            raise FileNotFoundError(f"{bucket}/{key}") from None

    def exists(self, path: str, **kwargs: Any) -> bool:
        """True if an object, a prefix or (for ``bucket``) a bucket is there; other errors propagate."""
        try:
            self.info(path)
        except FileNotFoundError:
            return False
        return True

    def isfile(self, path: str) -> bool:
        """True if ``path`` is an object (not a bucket or a prefix)."""
        bucket, key = self.split_path(path)
        if not key:
            return False
        try:
            self._call("head_object", Bucket=bucket, Key=key)
        except FileNotFoundError:
            return False
        return True

    def cat_file(self, path: str, start: int | None = None, end: int | None = None, **kwargs: Any) -> bytes:
        """The object's bytes (``[start, end)`` if given; negative ``start`` counts from the end)."""
        bucket, key = self.split_path(path)
        params: dict[str, Any] = {"Bucket": bucket, "Key": key}
        if start is not None or end is not None:
            first, last = start or 0, end
            if first < 0 or (last is not None and last < 0):
                size = self.info(path)["size"]
                first = max(size + first, 0) if first < 0 else first
                last = size + last if last is not None and last < 0 else last
            if last is not None and last <= first:
                return b""
            params["Range"] = f"bytes={first}-{'' if last is None else last - 1}"
        body = self._call("get_object", **params)["Body"]
        with contextlib.closing(body):
            return body.read()

    def get_file(self, rpath: str, lpath: str, callback: Callback = DEFAULT_CALLBACK, outfile: Any = None,
                 **kwargs: Any) -> None:
        """Stream ``rpath`` into the local file ``lpath``; ``callback`` gets the size and each chunk's length."""
        bucket, key = self.split_path(rpath)
        response = self._call("get_object", Bucket=bucket, Key=key)
        body = response["Body"]
        callback.set_size(response.get("ContentLength"))
        with contextlib.closing(body), (open(lpath, "wb") if outfile is None else contextlib.nullcontext(outfile)) \
                as out:
            for chunk in body.iter_chunks(_READ_CHUNK):
                out.write(chunk)
                callback.relative_update(len(chunk))

    def _open(self, path: str, mode: str = "rb", block_size: int | None = None, autocommit: bool = True,
              cache_options: dict[str, Any] | None = None, **kwargs: Any) -> "_ObjectReader":
        if mode != "rb":
            raise ConfigError(
                f"Opening S3 objects for writing ({mode!r}) is not supported while moto's mock_aws is active: "
                f"write with put_file / pipe_file, {MOCK_FIX}.")
        return _ObjectReader(self, path, mode, block_size=block_size or DEFAULT_PART_SIZE,
                             cache_options=cache_options)

    # -- writing ----------------------------------------------------------------------------
    def pipe_file(self, path: str, value: bytes, mode: str = "overwrite", chunksize: int | None = None,
                  **kwargs: Any) -> None:
        """Write ``value`` as the object ``path``; ``mode="create"`` raises ``FileExistsError`` if it exists.

        Other keyword arguments are PutObject / CreateMultipartUpload parameters (``ContentType``...), as in s3fs.
        """
        bucket, key = self.split_path(path)
        match = _condition(mode)
        data = memoryview(value).cast("B") if not isinstance(value, bytes) else value
        part = _part_size(len(data), chunksize)
        if len(data) < min(_MAX_PUT, 2 * part):
            self._call("put_object", Bucket=bucket, Key=key, Body=bytes(data), **kwargs, **match)
        else:
            chunks = (bytes(data[i:i + part]) for i in range(0, len(data), part))
            self._multipart(bucket, key, chunks, match, params=kwargs)

    def put_file(self, lpath: str, rpath: str, callback: Callback = DEFAULT_CALLBACK, chunksize: int | None = None,
                 max_concurrency: int | None = None, mode: str = "overwrite", **kwargs: Any) -> None:
        """Upload the local file ``lpath`` as ``rpath``: one PUT below two parts, else parts of ``chunksize``.

        Parts are sent one after another (``max_concurrency`` is accepted and
        ignored). ``mode="create"`` raises ``FileExistsError`` if ``rpath``
        exists; a failed multipart upload is aborted. Other keyword arguments
        are PutObject / CreateMultipartUpload parameters, as in s3fs.
        """
        bucket, key = self.split_path(rpath)
        match = _condition(mode)
        size = os.path.getsize(lpath)
        callback.set_size(size)
        part = _part_size(size, chunksize)
        with open(lpath, "rb") as f:
            if size < min(_MAX_PUT, 2 * part):
                self._call("put_object", Bucket=bucket, Key=key, Body=f.read(), **kwargs, **match)
                callback.relative_update(size)
            else:
                self._multipart(bucket, key, iter(lambda: f.read(part), b""), match, callback.relative_update,
                                params=kwargs)

    def rm_file(self, path: str) -> None:
        """Delete the object ``path`` (S3 reports success for a missing key)."""
        bucket, key = self.split_path(path)
        self._call("delete_object", Bucket=bucket, Key=key)

    def invalidate_cache(self, path: str | None = None) -> None:
        """Nothing to do: every listing is read fresh."""

    def _multipart(self, bucket: str, key: str, parts: Iterable[bytes], match: Mapping[str, str],
                   progress: Callable[[int], Any] | None = None, params: Mapping[str, Any] | None = None) -> None:
        upload = self._call("create_multipart_upload", Bucket=bucket, Key=key, **(params or {}))["UploadId"]
        try:
            done = []
            for number, data in enumerate(parts, 1):
                out = self._call("upload_part", Bucket=bucket, Key=key, UploadId=upload, PartNumber=number, Body=data)
                done.append({"PartNumber": number, "ETag": out["ETag"]})
                if progress is not None:
                    progress(len(data))
            self._call("complete_multipart_upload", Bucket=bucket, Key=key, UploadId=upload,
                       MultipartUpload={"Parts": done}, **match)
        except BaseException:
            with contextlib.suppress(Exception):
                self._call("abort_multipart_upload", Bucket=bucket, Key=key, UploadId=upload)
            raise


class _ObjectReader(AbstractBufferedFile):
    """A read-only, seekable object: ranged GETs of ``blocksize`` through fsspec's read-ahead cache."""

    def _fetch_range(self, start: int, end: int) -> bytes:
        if start >= end:
            return b""
        return self.fs.cat_file(self.path, start, end)


def _condition(mode: str) -> dict[str, str]:
    if mode == "create":
        return {"IfNoneMatch": "*"}
    if mode == "overwrite":
        return {}
    raise ValueError(f"mode must be 'overwrite' or 'create', got {mode!r}")


def _part_size(size: int, chunksize: int | None) -> int:
    """``chunksize`` (default 8 MiB), grown if needed to stay within S3's 10,000 parts."""
    return max(chunksize or DEFAULT_PART_SIZE, math.ceil(size / _MAX_PARTS))


def _file(name: str, size: int, modified: Any, etag: Any) -> dict[str, Any]:
    return {"name": name, "size": int(size), "type": "file", "LastModified": modified, "ETag": etag}


def _directory(name: str) -> dict[str, Any]:
    return {"name": name, "size": 0, "type": "directory"}
