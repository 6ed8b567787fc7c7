"""moto's in-process mock (``moto.mock_aws``): detect it, and choose the S3 transport it can intercept.

moto 5 intercepts AWS calls in-process through a ``BotocoreStubber`` that it
appends to botocore's ``BUILTIN_HANDLERS`` (``moto.core.models.botocore_stubber``,
a ``before-send`` handler); ``mock_aws`` start/stop switch its ``enabled`` flag
(nested mocks are counted, so the flag is on while any is active). The stubber
answers synchronously, which s3fs's aiobotocore cannot await (``TypeError:
object bytes can't be used in 'await' expression``), and any transport that
does not send through botocore's event system would bypass the mock and reach
the network.

So while the mock is active, ``s3://`` and ``s3a://`` use
``cloudckpt.s3_botocore.BotocoreS3FileSystem``, a synchronous botocore client
that moto answers in-process. ``mock_transport`` is the one place that decides:
any S3 transport added later must consult it and step aside
(tests/test_moto_mock.py fails otherwise).

Detection never imports moto: if ``moto.core.models`` is not imported, no mock
can be active.
"""

from __future__ import annotations

import functools
import logging
import sys
import threading
from typing import Any, Callable

from .errors import ConfigError

__all__ = ["moto_mock_active", "mock_transport", "bypassed_mock_error", "serialize_conditional_writes", "MOCK_FIX"]

log = logging.getLogger("cloudckpt")
# one of these is held by a conditional write for its check and store: the one its object's name hashes to
# (concurrent conditional writes of other objects rarely wait for each other)
_CONDITIONAL_WRITES = tuple(threading.Lock() for _ in range(64))
_PATCHING = threading.Lock()
# moto's handlers that check a write's condition (If-None-Match / If-Match) and then store: PutObject, and
# CompleteMultipartUpload (a POST on the key)
_CONDITIONAL_HANDLERS = ("put_object", "_key_response_post")

S3_PROTOCOLS = ("s3", "s3a")
# What to tell a user whose test cannot run under the in-process mock.
MOCK_FIX = ("or test against moto's S3 server on 127.0.0.1 instead of mock_aws: the cloudckpt_s3 pytest fixture "
            "(pip install 'cloudckpt[test]'; see the README, 'Testing your training code in CI')")


def moto_mock_active() -> bool:
    """True while a ``moto.mock_aws`` (decorator, context manager or ``start()``) is active in this process."""
    models = sys.modules.get("moto.core.models")
    stubber = getattr(models, "botocore_stubber", None)
    return bool(getattr(stubber, "enabled", False))


def mock_transport(protocol: str) -> type | None:
    """The filesystem class ``protocol`` must use instead of fsspec's registered one, or None.

    Returns ``BotocoreS3FileSystem`` for ``s3``/``s3a`` while moto's in-process mock is active.
    """
    if protocol in S3_PROTOCOLS and moto_mock_active():
        from .s3_botocore import BotocoreS3FileSystem

        serialize_conditional_writes()

        return BotocoreS3FileSystem
    return None


def bypassed_mock_error(fs: Any, url: str) -> ConfigError | None:
    """The error to raise when ``fs`` failed because moto's mock is active but ``fs`` cannot go through it.

    That is an s3fs filesystem created before ``mock_aws`` started (a hook
    built outside the mock, used inside it). None in every other case.
    """
    if not moto_mock_active() or not type(fs).__module__.startswith("s3fs"):
        return None
    return ConfigError(
        f"{url} was opened before moto's mock_aws() started, so its S3 client (s3fs) is not one the mock can "
        f"intercept. Create the hook (or call cloudckpt) inside the mock, {MOCK_FIX}.")


def serialize_conditional_writes() -> None:
    """Make moto decide conditional writes atomically, as S3 does (idempotent; for the whole process).

    moto (5.x, ``moto.s3.responses.S3Response``) checks ``If-None-Match: *`` / ``If-Match`` and stores the
    object afterwards with no lock in between, so two concurrent create-only writes of one key can both be
    answered 200, the later overwriting the earlier, whose writer then believes it appended: the commit log's
    "exactly one party wins an index" (``commitlog.py``) and create-only checkpoint uploads rest on S3's
    atomic decision (S3 User Guide, "Conditional writes"). Here a conditional request's check and store
    run under a lock chosen by the object's bucket and key (unconditional requests are untouched). Called by
    ``EmbeddedS3`` and, while ``mock_aws`` is active, by ``mock_transport``. A moto without these handlers
    is left as it is.
    """
    try:
        from moto.s3.responses import S3Response
    except ImportError:
        return
    with _PATCHING:
        if getattr(S3Response, "_cloudckpt_conditional_writes_serialized", False):
            return
        for name in _CONDITIONAL_HANDLERS:
            handler = getattr(S3Response, name, None)
            if handler is None:
                log.debug("moto's S3Response has no %s: its conditional writes are left as they are", name)
                continue
            setattr(S3Response, name, _serialized(handler))
        S3Response._cloudckpt_conditional_writes_serialized = True  # type: ignore[attr-defined]


def _serialized(handler: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(handler)
    def run(self: Any, *args: Any, **kwargs: Any) -> Any:
        headers = getattr(self, "headers", None) or {}
        if headers.get("If-None-Match") is None and headers.get("If-Match") is None:
            return handler(self, *args, **kwargs)
        try:  # the object, however addressed (path- or virtual-host-style)
            target: Any = (self.bucket_name, self.parse_key_name())
        except Exception:  # noqa: BLE001 - another moto: one lock per request path then
            target = (getattr(self, "path", None), headers.get("Host"))
        with _CONDITIONAL_WRITES[hash(target) % len(_CONDITIONAL_WRITES)]:
            return handler(self, *args, **kwargs)
    return run
