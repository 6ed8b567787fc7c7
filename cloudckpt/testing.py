"""pytest plugin for testing training code that uses cloudckpt: S3 and GCS on 127.0.0.1, and ``assert_committed``.

``pip install 'cloudckpt[test]'`` registers it through the ``pytest11`` entry
point ``cloudckpt.testing``: its fixtures are available in every test, with no
import or conftest line (``-p no:cloudckpt.testing`` turns it off). Where the
entry point is not installed, ``pytest -p cloudckpt.testing`` or
``pytest_plugins = ["cloudckpt.testing"]`` in the root conftest.py loads it.

Fixtures (a server starts when a test first asks for it, once per session, and
stops when the session ends; importing this module starts nothing and imports
neither TensorFlow, moto nor gcsfs):

``cloudckpt_s3``
    A fresh bucket on moto's S3 server (server mode: real HTTP on 127.0.0.1),
    deleted after the test: an ``EmulatedBucket`` with ``.url(prefix)``,
    ``.storage_options`` and ``.endpoint``.
``cloudckpt_gcs``
    The same on a GCS emulator (gcp-storage-emulator on 127.0.0.1, or the one
    ``STORAGE_EMULATOR_HOST`` names). Needs ``GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false``
    before gcsfs is imported (see ``cloudckpt.gcs_emulator``).
``cloudckpt_s3_server``, ``cloudckpt_gcs_server``
    The session's servers themselves (``cloudckpt.embedded.EmbeddedS3``,
    ``cloudckpt.gcs_emulator.GcsEmulator``).

``assert_committed(url, step=None, storage_options=None)`` checks a committed
checkpoint the way ``cloudckpt verify`` does and fails the test with a
message naming the step, each bad file, and what was expected and found.

For tests that use moto's in-process mock (``moto.mock_aws``) instead, no
fixture is needed: cloudckpt detects the mock (``cloudckpt.moto_mock``).
"""

from __future__ import annotations

import copy
import uuid
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator, Mapping

import pytest

from .errors import IntegrityError, RemoteError
from .restore import MISSING, SIZE_MISMATCH, CheckpointNotFoundError, FileCheck, VerifyReport, verify
from .urls import display_url

if TYPE_CHECKING:
    from .embedded import EmbeddedS3
    from .gcs_emulator import GcsEmulator

__all__ = ["EmulatedBucket", "assert_committed", "cloudckpt_s3", "cloudckpt_gcs", "cloudckpt_s3_server",
           "cloudckpt_gcs_server"]


@dataclass(frozen=True)
class EmulatedBucket:
    """A bucket of its own on a test server, for one test.

    Attributes:
        scheme: ``"s3"`` or ``"gs"``.
        name: the bucket's name.
        endpoint: the server's base URL (``http://127.0.0.1:<port>``).
    """

    scheme: str
    name: str
    endpoint: str
    _options: Mapping[str, Any] = field(repr=False)

    def url(self, prefix: str = "run") -> str:
        """The URL of directory ``prefix`` in the bucket, e.g. ``s3://ckpt-1a2b/run`` (the bucket for "")."""
        prefix = prefix.strip("/")
        return f"{self.scheme}://{self.name}/{prefix}" if prefix else f"{self.scheme}://{self.name}"

    @property
    def storage_options(self) -> dict[str, Any]:
        """What to pass as ``storage_options`` for this bucket's URLs (a fresh copy each time)."""
        return copy.deepcopy(dict(self._options))


def _bucket_name() -> str:
    return f"ckpt-{uuid.uuid4().hex[:12]}"


def _cleanup(delete: Any, url: str) -> None:
    """Delete a test's bucket; a failure (an upload still running after the test) only warns."""
    try:
        delete()
    except Exception as exc:  # noqa: BLE001 - the test's outcome is already decided
        warnings.warn(f"cloudckpt: could not delete test bucket {url}: {type(exc).__name__}: {exc}", stacklevel=1)


@pytest.fixture(scope="session")
def cloudckpt_s3_server() -> Iterator["EmbeddedS3"]:
    """moto's S3 server (server mode, real HTTP) on 127.0.0.1, for the whole session."""
    from .embedded import EmbeddedS3

    with EmbeddedS3() as server:
        yield server


@pytest.fixture
def cloudckpt_s3(cloudckpt_s3_server: "EmbeddedS3") -> Iterator[EmulatedBucket]:
    """A fresh bucket on the session's moto S3 server, deleted after the test."""
    name = _bucket_name()
    url = cloudckpt_s3_server.create_bucket(name)
    yield EmulatedBucket("s3", name, cloudckpt_s3_server.endpoint, cloudckpt_s3_server.storage_options)
    _cleanup(lambda: cloudckpt_s3_server.delete_bucket(name), url)


@pytest.fixture(scope="session")
def cloudckpt_gcs_server() -> Iterator["GcsEmulator"]:
    """A GCS emulator on 127.0.0.1 (or ``$STORAGE_EMULATOR_HOST``'s), for the whole session."""
    from .gcs_emulator import GcsEmulator

    with GcsEmulator() as emulator:
        yield emulator


@pytest.fixture
def cloudckpt_gcs(cloudckpt_gcs_server: "GcsEmulator") -> Iterator[EmulatedBucket]:
    """A fresh bucket on the session's GCS emulator, deleted after the test."""
    name = _bucket_name()
    cloudckpt_gcs_server.make_bucket(name)
    yield EmulatedBucket("gs", name, cloudckpt_gcs_server.endpoint, cloudckpt_gcs_server.storage_options())
    _cleanup(lambda: cloudckpt_gcs_server.delete_bucket(name), f"gs://{name}")


def assert_committed(url: str, step: int | None = None, storage_options: Mapping[str, Any] | None = None,
                     ) -> VerifyReport:
    """Assert that ``url`` holds a committed checkpoint (the newest, or ``step``) whose files are intact.

    Checks like ``cloudckpt verify``: reads the manifest, then re-reads every
    file it lists from the store and compares its size and crc32c (the
    store's own checksums are not trusted here).

    Returns:
        The ``VerifyReport``, all files ok.

    Raises:
        AssertionError: nothing committed (at ``step``), an unreadable manifest,
            a storage error, or a file missing or differing from its manifest;
            the message names the step, each bad file, expected and found.
        ConfigError: an unusable URL or storage_options (a mistake in the test).
    """
    __tracebackhide__ = True
    where = display_url(url)
    try:
        report = verify(url, step, storage_options=storage_options, use_store_checksums=False)
    except (CheckpointNotFoundError, IntegrityError, RemoteError) as exc:
        which = "a committed checkpoint" if step is None else f"a committed checkpoint at step {step}"
        # The message says it all; no chained library frames (their arguments include storage_options).
        raise AssertionError(f"expected {which} in {where}: {type(exc).__name__}: {exc}") from None
    if not report.ok:
        lines = [f"checkpoint step {report.step} in {where} is not intact: "
                 f"{len(report.problems)} of {len(report.files)} file(s) differ from the manifest"]
        lines += [f"  {check.name}: {_mismatch(check)}" for check in report.problems]
        raise AssertionError("\n".join(lines))
    return report


def _mismatch(check: FileCheck) -> str:
    if check.status == MISSING:
        return f"missing (expected {check.expected_size} bytes, crc32c {check.expected_crc32c}; found no object)"
    if check.status == SIZE_MISMATCH:
        return f"size mismatch (expected {check.expected_size} bytes, found {check.found_size})"
    return f"checksum mismatch (expected crc32c {check.expected_crc32c}, found {check.found_crc32c})"
