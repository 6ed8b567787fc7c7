"""Makes TensorFlow and Keras unimportable in a Python started with this directory first on PYTHONPATH.

Python imports ``sitecustomize`` at start-up; this one puts a finder first on
``sys.meta_path`` that answers an import of ``tensorflow``, ``keras`` or
``tf_keras`` (or a submodule) the way a missing package does: with
``ModuleNotFoundError``. Every attempt is appended to the file named by
``$CLOUDCKPT_BLOCKED_IMPORTS`` (if set), so a test can tell "works without
TensorFlow" from "tried to import it and swallowed the error".
"""

from __future__ import annotations

import os
import sys

BLOCKED = ("tensorflow", "keras", "tf_keras")


class _Absent:
    """A meta path finder for which the blocked packages do not exist."""

    def find_spec(self, name, path=None, target=None):  # noqa: ANN001, ANN201 - importlib protocol
        top = name.partition(".")[0]
        if top not in BLOCKED:
            return None
        record = os.environ.get("CLOUDCKPT_BLOCKED_IMPORTS")
        if record:
            with open(record, "a") as f:
                f.write(name + "\n")
        raise ModuleNotFoundError(f"No module named {name!r}", name=name)

    def invalidate_caches(self) -> None:
        pass


sys.meta_path.insert(0, _Absent())
