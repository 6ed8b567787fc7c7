"""The GCS emulator for the project's tests: the library's (``cloudckpt.gcs_emulator``) plus gcsfs retry helpers.

Importing it sets ``GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false`` before gcsfs is
imported (see ``cloudckpt.gcs_emulator``).
"""

from __future__ import annotations

from typing import List

from cloudckpt.gcs_emulator import (EMULATOR_ENV_VAR, GCSFS_ENV, GcsEmulator,  # noqa: F401 - re-exported
                                    check_gcsfs_import_order)

__all__ = [
    "GcsEmulator",
    "GCSFS_ENV",
    "EMULATOR_ENV_VAR",
    "check_gcsfs_import_order",
    "record_gcsfs_backoff",
    "set_gcsfs_retries",
]


def record_gcsfs_backoff(monkeypatch) -> List[float]:
    """Make gcsfs's internal retry loop skip its backoff sleeps (1, 2, 4, 8, 16 s
    + jitter) and return the list the requested delays are appended to.

    Only ``gcsfs.retry`` sees the fake ``asyncio``; everything else is untouched.
    """
    import types

    import gcsfs.retry

    delays: List[float] = []

    async def _no_sleep(delay, *args, **kwargs):
        delays.append(delay)

    monkeypatch.setattr(gcsfs.retry, "asyncio", types.SimpleNamespace(sleep=_no_sleep))
    return delays


def set_gcsfs_retries(monkeypatch, attempts: int) -> None:
    """Change how many attempts ``GCSFileSystem._request`` makes (default 6).

    gcsfs binds the count at class-definition time
    (``@retry_request(retries=retries)``), so neither ``fs.retries = n`` nor a
    storage option changes it; the method has to be re-decorated.
    """
    import gcsfs
    from gcsfs.retry import retry_request

    cls = gcsfs.GCSFileSystem
    raw = cls._request.__wrapped__
    monkeypatch.setattr(cls, "_request", retry_request(retries=attempts)(raw))
