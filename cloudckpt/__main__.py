"""``python -m cloudckpt``: the ``cloudckpt`` command line (``cloudckpt.cli``)."""

from .cli import run

run()
