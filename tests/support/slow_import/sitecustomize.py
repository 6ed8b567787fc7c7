"""Holds up one import in a Python started with this directory first on PYTHONPATH, so that a test can send
a signal while it is in progress (what a Ctrl-C during a command's start-up is).

Python imports ``sitecustomize`` at start-up; this one puts a finder first on
``sys.meta_path`` that, when the module named by ``$CLOUDCKPT_SLOW_IMPORT`` is
imported (the first time), prints ``importing <name>`` on stderr and waits
there (up to 120 s, then the import goes on): a SIGINT meanwhile raises
``KeyboardInterrupt`` from inside that import, as it would from the module's
own code.
"""

from __future__ import annotations

import os
import sys
import time


class _Slow:
    """A meta path finder that waits in the named module's import, then lets the other finders find it."""

    def __init__(self, name: str) -> None:
        self.name = name

    def find_spec(self, name, path=None, target=None):  # noqa: ANN001, ANN201 - importlib protocol
        if name != self.name:
            return None
        sys.meta_path.remove(self)  # once
        print(f"importing {name}", file=sys.stderr, flush=True)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            time.sleep(0.05)  # a SIGINT's KeyboardInterrupt is raised here
        return None


if os.environ.get("CLOUDCKPT_SLOW_IMPORT"):
    sys.meta_path.insert(0, _Slow(os.environ["CLOUDCKPT_SLOW_IMPORT"]))
