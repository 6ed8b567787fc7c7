"""Checkpoint directory URLs: what is a URL, what is a local path, and the one form any message shows.

A ``checkpoint_dir`` is a URL only when it starts with ``scheme://`` (an
RFC 3986 scheme: a letter, then letters, digits, ``+``, ``.`` or ``-``).
Anything else is a local path, whatever characters it holds:
``runs/sweep::lr=0.1``, ``data:2026-01-01``, ``#``, spaces, non-ASCII. URLs
are never chained: ``::`` is part of a path or key.

A URL may carry credentials in its userinfo (``sftp://user:password@host/dir``).
They are credentials, never part of the location: the filesystem receives
them as its ``username`` / ``password`` options. The *display form*
(``display_url``) replaces the userinfo with ``***`` and every query value
with ``***``; it is what every log line, error, ``CheckpointInfo`` and CLI
output shows. ``redact`` applies the same rules to free text (backend error
messages), and ``sanitized_cause`` keeps secrets out of exception chains.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Mapping
from urllib.parse import unquote

from .errors import ConfigError, RedactedError

MASK = "***"

# Query parameters whose values are shown (case-insensitive names): request shapes of S3 ListObjects(V2),
# multipart uploads and the GCS JSON API, which carry no credential and which a user needs to debug a
# failed request ("which prefix was listed?"). Every other parameter's value is masked: signatures,
# credentials, tokens, API keys, unknown ones -- and continuation-token (opaque, not a credential, kept
# masked to be safe).
SAFE_QUERY_PARAMETERS: frozenset[str] = frozenset(name.lower() for name in (
    "list-type", "prefix", "delimiter", "max-keys", "start-after", "encoding-type",  # S3 ListObjects(V2)
    "partNumber", "uploadId",  # S3 multipart uploads
    "maxResults", "uploadType", "name", "alt",  # GCS JSON API (prefix, delimiter above)
))

_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")
_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>()\[\]{}]+")
# Query parameters that carry credentials, for text where no URL can be recognised (no scheme).
_SECRET_PARAMETER = re.compile(
    r"(?P<key>(?:^|(?<=[?&;\s,]))(?:access_token|id_token|refresh_token|token|key|secret|password|passwd|pwd|"
    r"sig|signature|credential|api_key|apikey|client_secret|x-amz-signature|x-amz-credential|"
    r"x-amz-security-token|x-goog-signature|x-goog-credential)=)[^&\s'\"]+", re.I)
# storage_options keys whose string values are credentials (scrubbed from backend messages too).
_SECRET_OPTION = re.compile(r"secret|passw|token|credential|sas|signature|(account|private)_key$", re.I)
_PASTED_USERINFO = re.compile(r"[^/:@]+:(?!\d{1,5}/)[^@]*?/[^@]*@")  # not host:port/path@...
_MIN_SECRET_LENGTH = 2  # a userinfo password or query value
_MIN_OPTION_SECRET_LENGTH = 8  # real keys are long; short test values ("testing") would mangle messages


@dataclass(frozen=True)
class CheckpointUrl:
    """A ``checkpoint_dir`` split into the parts cloudckpt treats differently.

    Attributes:
        raw: the string as given; holds any credentials.
        scheme: lower-case URL scheme, or None for a local path.
        userinfo: the raw ``user[:password]`` before ``@``, or None.
        location: what follows ``scheme://`` and the userinfo: bucket or host, path and any query.
    """

    raw: str
    scheme: str | None
    userinfo: str | None
    location: str

    def __repr__(self) -> str:
        return f"CheckpointUrl({self.display!r})"  # never the raw URL: it holds the credentials

    @property
    def is_local(self) -> bool:
        """True for a plain local path (no ``scheme://``)."""
        return self.scheme is None

    @property
    def username(self) -> str | None:
        """The user of the userinfo (percent-decoded), if any."""
        return None if self.userinfo is None else unquote(self.userinfo.partition(":")[0])

    @property
    def password(self) -> str | None:
        """The password of the userinfo (percent-decoded: ``%2F`` is ``/``), if it has one."""
        if self.userinfo is None or ":" not in self.userinfo:
            return None
        return unquote(self.userinfo.partition(":")[2])

    @property
    def query(self) -> str | None:
        """The query string after ``?`` (None without one; local paths have none)."""
        if self.is_local or "?" not in self.location:
            return None
        return self.location.partition("?")[2]

    @property
    def without_credentials(self) -> str:
        """``scheme://location``: the URL with its userinfo removed (what the filesystem gets as a path)."""
        return self.raw if self.is_local else f"{self.scheme}://{self.location}"

    @property
    def display(self) -> str:
        """The form shown everywhere: userinfo and query values masked (but those of
        ``SAFE_QUERY_PARAMETERS``), everything else as given."""
        if self.is_local:
            return self.raw
        scheme = self.raw[: self.raw.index("://")]  # as the user spelled it
        location = self.location
        if "?" in location:
            path, _, query = location.partition("?")
            location = f"{path}?{_mask_query(query)}"
        return f"{scheme}://{MASK + '@' if self.userinfo is not None else ''}{location}"

    @property
    def secrets(self) -> tuple[str, ...]:
        """Literal strings that must never appear in any output: the userinfo, its password, query values
        (but those of ``SAFE_QUERY_PARAMETERS``, which the display form shows)."""
        found = [self.userinfo, self.password, None if self.userinfo is None else self.userinfo.partition(":")[2]]
        if self.query:
            found += [value for key, _, value in (item.partition("=") for item in self.query.split("&"))
                      if not _is_safe_parameter(key)]
        return tuple(s for s in found if s and len(s) >= _MIN_SECRET_LENGTH)


def parse_url(url: str) -> CheckpointUrl:
    """Split ``url`` (a URL or a local path) into its parts; see ``CheckpointUrl``.

    The userinfo is everything before the last ``@`` of the authority (the
    text up to the first ``/``), so a password holding ``?``, ``#`` or ``@``
    is still recognised as one; a ``/`` in a password must be written ``%2F``.
    """
    raw = url
    match = _SCHEME.match(raw)
    if match is None:
        return CheckpointUrl(raw=raw, scheme=None, userinfo=None, location=raw)
    rest = raw[match.end():]
    authority = rest.split("/", 1)[0]
    at = authority.rfind("@")
    if at < 0:
        # RFC 3986 wants "/" in a password written %2F, but AWS secret keys hold raw "/" and get pasted
        # as they are: "user:pass/with/slashes@" (a user name has no "/", ":" or "@") is userinfo too.
        pasted = _PASTED_USERINFO.match(rest)
        if pasted is None:
            return CheckpointUrl(raw=raw, scheme=match.group(1).lower(), userinfo=None, location=rest)
        at = pasted.end() - 1
    return CheckpointUrl(raw=raw, scheme=match.group(1).lower(), userinfo=rest[:at], location=rest[at + 1:])


def is_local_path(url: "str | os.PathLike[str]") -> bool:
    """True for a plain filesystem path: anything that does not start with ``scheme://``."""
    return _SCHEME.match(os.fspath(url)) is None


def display_url(url: str) -> str:
    """The display form of a URL or local path (see the module docstring)."""
    return parse_url(url).display


def as_url(value: "str | os.PathLike[str]", argument: str = "checkpoint_dir") -> str:
    """``value`` (a URL, a local path or an ``os.PathLike``) as a ``str``, checked first thing by every entry point.

    Raises:
        ConfigError: (a ``ValueError``) not a str or ``os.PathLike`` of one (bytes, None, a number), or empty;
            the message names ``argument``.
    """
    text = os.fspath(value) if isinstance(value, os.PathLike) else value
    if not isinstance(text, str) or not text:
        got = repr(text) if isinstance(text, str) else f"a value of type {type(text).__name__}"
        raise ConfigError(f"{argument} must be a non-empty local path or URL string (s3://bucket/dir, gs://..., "
                          f"/local/dir), got {got}.")
    return text


def check_storage_options(storage_options: Any) -> None:
    """Refuse ``storage_options`` that are not a mapping of option names (never shown: values hold credentials).

    Raises:
        ConfigError: a list, string or other non-mapping.
    """
    if storage_options is not None and not isinstance(storage_options, Mapping):
        raise ConfigError(f"storage_options must be a dict of the filesystem's options (s3: endpoint_url, key, "
                          f"secret...; gs: token, project...) or None, got a value of type "
                          f"{type(storage_options).__name__}.")


def option_secrets(storage_options: Mapping[str, Any] | None) -> tuple[str, ...]:
    """String values of credential-like ``storage_options`` keys (``secret``, ``token``, ``password``,
    ``sas_token``, ``account_key``...), nested dicts included: scrubbed from any backend text that might echo them."""
    def walk(options: Mapping[str, Any]) -> Iterator[str]:
        for name, value in options.items():
            if isinstance(value, Mapping):
                yield from walk(value)
            elif isinstance(value, str) and len(value) >= _MIN_OPTION_SECRET_LENGTH \
                    and _SECRET_OPTION.search(str(name)):
                yield value
    return tuple(walk(storage_options or {}))


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` with credentials removed: the given literal ``secrets``, the userinfo and query values of
    every URL in it (its display form: values of ``SAFE_QUERY_PARAMETERS`` such as ``prefix`` are kept),
    and credential-named query parameters (``token=``, ``sig=``...)."""
    for secret in sorted({s for s in secrets if s}, key=len, reverse=True):
        text = text.replace(secret, MASK)
    text = _URL_IN_TEXT.sub(lambda m: display_url(m.group(0)), text)
    return _SECRET_PARAMETER.sub(lambda m: m.group("key") + MASK, text)


def sanitized_cause(exc: BaseException, secrets: Iterable[str] = ()) -> BaseException:
    """``exc`` itself if no text in its chain holds a credential; else a ``RedactedError`` chain standing in.

    The stand-in keeps the original's type name, redacted message, traceback
    (code locations only) and, for botocore errors, the service error code and
    HTTP status, so retry classification and cause labels still work.
    """
    secrets = tuple(secrets)
    cache: dict[int, BaseException] = {}

    def leaks(e: BaseException | None, seen: set[int]) -> bool:
        while e is not None and id(e) not in seen:
            seen.add(id(e))
            if redact(_text_of(e), secrets) != _text_of(e):
                return True
            if e.__context__ is not None and e.__context__ is not e.__cause__ and leaks(e.__context__, seen):
                return True
            e = e.__cause__
        return False

    def clean(e: BaseException | None) -> BaseException | None:
        if e is None or not leaks(e, set()):
            return e
        if id(e) in cache:
            return cache[id(e)]
        kind = type(e).__qualname__ if type(e).__module__ == "builtins" else \
            f"{type(e).__module__}.{type(e).__qualname__}"
        stand_in = RedactedError(f"{kind}: {redact(str(e), secrets)}", original_type=kind)
        cache[id(e)] = stand_in
        response = getattr(e, "response", None)
        if isinstance(response, dict) and "Error" in response:
            stand_in.response = {"Error": {"Code": response["Error"].get("Code")},
                                 "ResponseMetadata": {"HTTPStatusCode": response.get("ResponseMetadata", {})
                                                      .get("HTTPStatusCode")}}
        if getattr(e, "__notes__", None):
            stand_in.__notes__ = [redact(str(note), secrets) for note in e.__notes__]
        stand_in.__traceback__ = e.__traceback__
        stand_in.__cause__ = clean(e.__cause__)
        stand_in.__context__ = clean(e.__context__)
        stand_in.__suppress_context__ = e.__suppress_context__
        return stand_in

    return clean(exc)  # type: ignore[return-value]


class RedactingFilter(logging.Filter):
    """A backstop on the ``cloudckpt`` logger: applies ``redact`` to each record's message and traceback.

    The display form is the fix (messages never receive a raw URL); this
    only catches a secret-bearing URL that slipped into a message anyway.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        if record.exc_info and not record.exc_text:
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
        return True


def install_backstop(logger: logging.Logger) -> None:
    """Add a ``RedactingFilter`` to ``logger`` (once)."""
    if not any(isinstance(f, RedactingFilter) for f in logger.filters):
        logger.addFilter(RedactingFilter())


def _is_safe_parameter(key: str) -> bool:
    return unquote(key).lower() in SAFE_QUERY_PARAMETERS


def _mask_query(query: str) -> str:
    return "&".join(f"{key}={value if _is_safe_parameter(key) else MASK}" if sep else MASK
                    for key, sep, value in (item.partition("=") for item in query.split("&")))


def _text_of(exc: BaseException) -> str:
    notes = getattr(exc, "__notes__", None) or []
    return "\n".join([str(exc), *map(str, notes)])
