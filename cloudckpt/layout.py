"""How a step's files are named and recognised: the one place that parses checkpoint file names.

A *layout* says which files make up one checkpoint and how its name carries
the step. Everything else in cloudckpt (commit, manifests, catalog, retention,
restore, resume, the CLI) asks a layout instead of parsing names itself.

Every layout here is a **prefix layout**: a checkpoint is a *prefix* such as
``model.ckpt-30`` (``<basename>-<step>``) and its files are flat objects named
``<prefix>.<suffix>`` in the checkpoint directory (a store keeps no
sub-directories per checkpoint: manifests list flat names). A layout is given
by which suffixes belong to a checkpoint and which file must be present for
it to count as saved (the *marker*: it is written last on download, so a
checkpoint is locally present once its marker is there):

* ``TF`` (name ``"tf"``): TensorFlow's ``prefix.index`` + ``prefix.data-XXXXX-of-YYYYY``
  (+ ``prefix.meta`` from a TF1 Saver); ``.index`` is required. A restore does
  not read ``.meta`` (TF rewrites it when re-saving identical variables), so
  local copies and "same tensors" are compared without it.
  TF's ``checkpoint`` state file (``render_state_file`` / ``state_file_prefix``)
  belongs to this layout too.
* ``KERAS_BACKUP`` (``"keras-backup"``): ``cloudckpt.keras.BackupAndRestore``'s
  ``backup-<step>.weights.h5`` + ``backup-<step>.state.json`` (required).
* ``KERAS_MODEL`` (``"keras"``): ``cloudckpt.keras.ModelCheckpoint``'s one file per
  step, ``<name>-<step>.keras`` / ``.h5`` / ``.weights.h5``.
* ``PrefixLayout(name, suffixes, marker)``: any other set of files per step.
  ``register_layout`` makes it known to readers (``ls``, ``gc`` use registered
  layouts to recognise debris).

Manifests record their layout's ``name`` only when it is not ``"tf"``
(``Manifest.layout``), so every manifest written before layouts existed
(version 1 and 2) reads as a TF checkpoint.
"""

from __future__ import annotations

import glob
import os
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Mapping, Sequence

from .errors import ConfigError

if TYPE_CHECKING:
    from .commit import LocalCheckpoint

MANIFEST_SUFFIX = ".manifest.json"
STATE_FILE = "checkpoint"  # TF's state file: the latest checkpoint and the ones kept, by prefix

# ``<basename>-<step>``: any basename a Saver accepts, newlines included (DOTALL, fullmatch).
_PREFIX = re.compile(r"(?P<basename>.+)-(?P<step>[0-9]+)", re.DOTALL)
_MANIFEST_NAME = re.compile(r"(?P<prefix>.+)" + re.escape(MANIFEST_SUFFIX), re.DOTALL)
_STATE_PATH = re.compile(r'^model_checkpoint_path:\s*"(?P<path>(?:[^"\\]|\\.)*)"\s*$', re.M)
_STATE_PATHS = re.compile(r'^(?:all_)?model_checkpoint_paths?:\s*"(?P<path>(?:[^"\\]|\\.)*)"\s*$', re.M)


def check_basename(name: object, argument: str) -> str:
    """``name``, a checkpoint basename: objects are flat files ``<basename>-<step>.<suffix>`` in the directory.

    Raises:
        ConfigError: not a str, empty, ``.`` / ``..`` or holding a path separator (TF would save outside
            ``local_dir`` or fail at the first save, and nothing would be committed).
    """
    if not isinstance(name, str) or name in ("", ".", "..") or "/" in name or os.sep in name:
        raise ConfigError(f"{argument} must be a plain file name (no '/', not empty), got {name!r}: checkpoints are "
                          f"the flat files <{argument}>-<step>.* of the checkpoint directory.")
    return name


def split_prefix(prefix: str) -> tuple[str, int] | None:
    """``model.ckpt-30`` -> (``model.ckpt``, 30); None when the prefix does not end in ``-<step>``."""
    m = _PREFIX.fullmatch(prefix)
    return (m.group("basename"), int(m.group("step"))) if m else None


def step_of(prefix: str) -> int:
    """The step of a ``<basename>-<step>`` prefix.

    Raises:
        ValueError: the prefix does not end in ``-<step>``.
    """
    parsed = split_prefix(prefix)
    if parsed is None:
        raise ValueError(f"checkpoint prefix {prefix!r} does not end in -<step>")
    return parsed[1]


def basename_of(prefix: str) -> str:
    """``model.ckpt-30`` -> ``model.ckpt`` (the prefix itself when it has no ``-<step>``)."""
    parsed = split_prefix(prefix)
    return parsed[0] if parsed else prefix


def manifest_name(prefix: str) -> str:
    """Manifest object name of a checkpoint prefix: ``model.ckpt-30`` -> ``model.ckpt-30.manifest.json``."""
    return prefix + MANIFEST_SUFFIX


def parse_manifest_name(name: str) -> tuple[str, int] | None:
    """``model.ckpt-30.manifest.json`` -> (``model.ckpt-30``, 30); None for other names."""
    m = _MANIFEST_NAME.fullmatch(name)
    if not m:
        return None
    parsed = split_prefix(m.group("prefix"))
    return (m.group("prefix"), parsed[1]) if parsed else None


def committed_prefixes(names: Iterable[str]) -> list[tuple[str, int]]:
    """(prefix, step) of every manifest among object ``names``, ascending by step."""
    found = [p for p in (parse_manifest_name(n) for n in names) if p is not None]
    return sorted(found, key=lambda p: (p[1], p[0]))


@dataclass(frozen=True)
class PrefixLayout:
    """Checkpoints as groups of flat files ``<basename>-<step>.<suffix>``.

    Args:
        name: recorded in manifests of this layout (``"tf"`` is not recorded: the default).
        suffixes: regular expressions (fullmatch, without the leading dot) of the
            suffixes a checkpoint's files have, e.g. ``["keras"]``.
        marker: the suffix (a regular expression) of the file that must exist for
            the checkpoint to count as saved; written last when downloading.
        not_restored: suffixes of files a restore does not read; they are left out
            when a local copy is checked against its manifest, and when two saves
            are compared ("same tensors").

    Raises:
        ConfigError: an empty name or suffix list, or a regular expression that does not compile.
    """

    name: str
    suffixes: tuple[str, ...]
    marker: str
    not_restored: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.name or not isinstance(self.name, str):
            raise ConfigError(f"a layout needs a name, got {self.name!r}.")
        object.__setattr__(self, "suffixes", tuple(self.suffixes))
        object.__setattr__(self, "not_restored", tuple(self.not_restored))
        if not self.suffixes:
            raise ConfigError(f"layout {self.name!r} needs at least one file suffix.")
        try:
            object.__setattr__(self, "_file", re.compile(
                r"(?P<prefix>(?P<basename>.+)-(?P<step>[0-9]+))\.(?P<suffix>" + "|".join(
                    f"(?:{s})" for s in self.suffixes) + ")", re.DOTALL))
            object.__setattr__(self, "_marker", re.compile(self.marker, re.DOTALL))
            object.__setattr__(self, "_skip", re.compile("|".join(f"(?:{s})" for s in self.not_restored),
                                                         re.DOTALL) if self.not_restored else None)
        except re.error as exc:
            raise ConfigError(f"layout {self.name!r}: invalid suffix pattern ({exc}).") from None

    # -- names ----------------------------------------------------------------------------------------
    def parse_file(self, name: str) -> tuple[str, int] | None:
        """The checkpoint an object name belongs to: ``model.ckpt-30.index`` -> (``model.ckpt-30``, 30);
        None for names this layout does not write."""
        m = self._file.fullmatch(name)  # type: ignore[attr-defined]
        return (m.group("prefix"), int(m.group("step"))) if m else None

    def is_marker(self, name: str) -> bool:
        """True for the file whose presence makes a checkpoint count as saved (TF: its ``.index``)."""
        m = self._file.fullmatch(name)  # type: ignore[attr-defined]
        return bool(m) and bool(self._marker.fullmatch(m.group("suffix")))  # type: ignore[attr-defined]

    def is_restored(self, name: str) -> bool:
        """True for a file a restore reads (TF: everything but ``.meta``)."""
        m = self._file.fullmatch(name)  # type: ignore[attr-defined]
        skip = self._skip  # type: ignore[attr-defined]
        return not (m and skip is not None and skip.fullmatch(m.group("suffix")))

    def is_complete(self, names: Iterable[str]) -> bool:
        """True when ``names`` (one checkpoint's files) include the marker."""
        return any(self.is_marker(n) for n in names)

    def prefix_of(self, names: Iterable[str]) -> tuple[str, int]:
        """(prefix, step) of the checkpoint whose files are ``names``.

        Raises:
            ConfigError: a name this layout does not write, names of several
                checkpoints, or no marker file among them.
        """
        names = list(names)
        parsed = {self.parse_file(n) for n in names}
        if None in parsed or len(parsed) != 1:
            raise ConfigError(f"files {sorted(names)} are not the files of one checkpoint in the {self.name!r} "
                              f"layout (<basename>-<step>.<{'|'.join(self.suffixes)}>).")
        if not self.is_complete(names):
            raise ConfigError(f"files {sorted(names)} lack the file a checkpoint of the {self.name!r} layout "
                              f"needs (suffix {self.marker!r}).")
        return parsed.pop()  # type: ignore[return-value]

    # -- a local directory --------------------------------------------------------------------------
    def local_prefixes(self, directory: str) -> list[str]:
        """Prefixes of the saved checkpoints (marker present) in a local directory, by step, oldest first."""
        try:
            names = os.listdir(directory)
        except (FileNotFoundError, NotADirectoryError):
            return []
        found = {parsed for name in names if self.is_marker(name) and (parsed := self.parse_file(name))}
        return [prefix for prefix, _ in sorted(found, key=lambda p: (p[1], p[0]))]

    def find_local(self, directory: str, prefix: str) -> "LocalCheckpoint | None":
        """The files of checkpoint ``prefix`` in ``directory`` (None unless its marker is there)."""
        from .commit import LocalCheckpoint

        files: dict[str, str] = {}
        for path in glob.glob(os.path.join(glob.escape(directory), glob.escape(prefix) + ".*")):
            name = os.path.basename(path)
            parsed = self.parse_file(name)
            if parsed and parsed[0] == prefix and os.path.isfile(path):
                files[name] = path
        if not self.is_complete(files):
            return None
        return LocalCheckpoint(step=step_of(prefix), prefix=prefix, files=files, layout=self.name)

    def marker_path(self, directory: str, prefix: str) -> str | None:
        """The local path of checkpoint ``prefix``'s marker file in ``directory`` (None if absent)."""
        local = self.find_local(directory, prefix)
        if local is None:
            return None
        return next(path for name, path in sorted(local.files.items()) if self.is_marker(name))

    def find_saved(self, directory: str, step: int) -> "LocalCheckpoint | None":
        """The checkpoint of ``step`` just saved in ``directory``: the one TF's state file points at if it
        has that step, else the newest (by marker mtime) checkpoint of that step; None if there is none."""
        pointed = state_file_prefix(directory)
        if pointed is not None and split_prefix(pointed) is not None and step_of(pointed) == step:
            found = self.find_local(directory, pointed)
            if found is not None:
                return found
        try:
            names = os.listdir(directory)
        except FileNotFoundError:
            return None
        markers = [n for n in names if self.is_marker(n) and (p := self.parse_file(n)) and p[1] == step]
        if not markers:
            return None
        newest = max(markers, key=lambda n: os.path.getmtime(os.path.join(directory, n)))
        return self.find_local(directory, self.parse_file(newest)[0])  # type: ignore[index]


TF = PrefixLayout("tf", ("index", "meta", "data-[0-9]{5}-of-[0-9]{5}"), marker="index", not_restored=("meta",))
"""TensorFlow's checkpoint files: ``prefix.index`` (required), ``prefix.data-*``, ``prefix.meta``."""

DEFAULT_LAYOUT = TF.name
_LAYOUTS: dict[str, PrefixLayout] = {TF.name: TF}


def register_layout(layout: PrefixLayout) -> PrefixLayout:
    """Make ``layout`` known by name (to readers of manifests and to debris detection); returns it.

    Raises:
        ConfigError: another layout is registered under that name.
    """
    known = _LAYOUTS.get(layout.name)
    if known is not None and known != layout:
        raise ConfigError(f"a different layout is registered as {layout.name!r} already.")
    _LAYOUTS[layout.name] = layout
    return layout


KERAS_BACKUP = register_layout(PrefixLayout("keras-backup", (r"weights\.h5", r"state\.json"), marker=r"state\.json"))
"""``cloudckpt.keras.BackupAndRestore``: ``backup-<step>.weights.h5`` (``model.save_weights``: weights and
optimizer variables) and ``backup-<step>.state.json`` (the epoch and batch; required, written last)."""

KERAS_MODEL = register_layout(PrefixLayout("keras", (r"keras", r"weights\.h5", r"h5"), marker=r"keras|weights\.h5|h5"))
"""``cloudckpt.keras.ModelCheckpoint``: one file per step, ``<name>-<step>.keras`` (``model.save``),
``.h5`` (legacy) or ``.weights.h5`` (``model.save_weights``)."""


def get_layout(name: str | None) -> PrefixLayout:
    """The registered layout ``name`` (None: TF). An unknown name gets a layout that accepts any suffix
    (manifests of layouts this process does not know stay readable and restorable).
    """
    if name is None:
        return TF
    known = _LAYOUTS.get(name)
    return known if known is not None else PrefixLayout(name, (".+",), marker=".+")


def layouts() -> list[PrefixLayout]:
    """Every registered layout, TF first."""
    return list(_LAYOUTS.values())


def parse_object_name(name: str) -> tuple[str, int] | None:
    """The checkpoint (prefix, step) a checkpoint file or manifest belongs to, under any registered layout;
    None for other objects (``checkpoint``, ``graph.pbtxt``, files of other programs)."""
    for layout in _LAYOUTS.values():
        parsed = layout.parse_file(name)
        if parsed is not None:
            return parsed
    return parse_manifest_name(name)


# -- TF's ``checkpoint`` state file ------------------------------------------------------------------

def render_state_file(prefixes: Sequence[str], *, timestamps: Sequence[float] | None = None,
                      last_preserved: float | None = None) -> bytes:
    """TF's ``checkpoint`` state file (text proto) naming ``prefixes``, the last one as latest.

    Paths are relative, so the directory stays valid wherever it is copied or
    mounted. Strings are escaped as TF writes them (protobuf text format,
    UTF-8 kept), so any basename the Saver accepts reads back unchanged.
    ``timestamps`` (seconds since the epoch, one per prefix) and
    ``last_preserved`` are ``tf.train.CheckpointManager``'s bookkeeping
    (``all_model_checkpoint_timestamps``, ``last_preserved_timestamp``).
    """
    lines = [f'model_checkpoint_path: "{_text_proto_escape(prefixes[-1])}"']
    lines += [f'all_model_checkpoint_paths: "{_text_proto_escape(p)}"' for p in prefixes]
    if timestamps is not None:
        if len(timestamps) != len(prefixes):
            raise ValueError(f"{len(timestamps)} timestamps for {len(prefixes)} checkpoints")
        lines += [f"all_model_checkpoint_timestamps: {float(t)!r}" for t in timestamps]
    if last_preserved is not None:
        lines.append(f"last_preserved_timestamp: {float(last_preserved)!r}")
    return ("\n".join(lines) + "\n").encode("utf-8", "surrogateescape")


def state_file_timestamps(prefixes: Sequence[str], saved_at: Mapping[str, float | None]) -> \
        tuple[list[float] | None, float | None]:
    """(``all_model_checkpoint_timestamps``, ``last_preserved_timestamp``) for a state file naming
    ``prefixes``, from each checkpoint's save time (None: unknown). (None, None) when no save time is known.

    A checkpoint without a known time gets the oldest known one; ``last_preserved_timestamp`` is one
    second before the oldest, so ``tf.train.CheckpointManager`` manages every listed checkpoint (it
    drops those not newer than it).
    """
    known = [t for p in prefixes if (t := saved_at.get(p)) is not None]
    if not known:
        return None, None
    oldest = min(known)
    times = [t if (t := saved_at.get(p)) is not None else oldest for p in prefixes]
    return times, oldest - 1.0


# protobuf's text_encoding.CEscape(as_utf8=True): what TF's update_checkpoint_state writes.
_TEXT_PROTO_ESCAPES = {i: f"\\{i:03o}" for i in [*range(32), 127]}
_TEXT_PROTO_ESCAPES.update({ord("\t"): "\\t", ord("\n"): "\\n", ord("\r"): "\\r", ord('"'): '\\"',
                            ord("'"): "\\'", ord("\\"): "\\\\"})


def _text_proto_escape(text: str) -> str:
    return text.translate(_TEXT_PROTO_ESCAPES)


def state_file_prefix(local_dir: str) -> str | None:
    """The checkpoint the local TF ``checkpoint`` state file points at (basename), if any."""
    try:
        with open(os.path.join(local_dir, STATE_FILE), encoding="utf-8") as f:
            found = _STATE_PATH.search(f.read())
    except (FileNotFoundError, NotADirectoryError, UnicodeDecodeError):
        return None
    return os.path.basename(found.group("path")) if found else None


def state_file_prefixes(local_dir: str) -> set[str]:
    """Every checkpoint the local TF ``checkpoint`` state file names (basenames): the latest and the ones
    ``max_to_keep`` manages; empty without a readable state file. Escaped names are compared as written
    (TF escapes only quotes, backslashes and control characters, which checkpoint names do not hold)."""
    try:
        with open(os.path.join(local_dir, STATE_FILE), encoding="utf-8") as f:
            text = f.read()
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError, UnicodeDecodeError):
        return set()
    return {os.path.basename(m.group("path")) for m in _STATE_PATHS.finditer(text)}


def write_local_state_file(local_dir: str, latest: str | None = None) -> None:
    """Rewrite ``local_dir``'s TF ``checkpoint`` state file (atomically) listing every local checkpoint, with
    ``latest`` (a basename; default: the one the file points at now) last, and ``tf.train.CheckpointManager``'s
    and the Saver's timestamps: each checkpoint's ``.index`` mtime (what TF's ``get_checkpoint_mtimes`` reads),
    ``last_preserved_timestamp`` one second before the oldest, so TF keeps managing every listed checkpoint
    (``max_to_keep``, ``keep_checkpoint_every_n_hours``). Nothing is written without a local checkpoint."""
    import uuid

    pointed = latest or state_file_prefix(local_dir)
    prefixes = [p for p in TF.local_prefixes(local_dir) if p != pointed] + ([pointed] if pointed else [])
    markers = [(p, m) for p in prefixes if (m := TF.marker_path(local_dir, p)) is not None]
    if not markers:
        return
    times = [os.path.getmtime(m) for _, m in markers]
    data = render_state_file([p for p, _ in markers], timestamps=times, last_preserved=min(times) - 1.0)
    tmp = os.path.join(local_dir, f".{STATE_FILE}.tmp-{uuid.uuid4().hex[:8]}")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, os.path.join(local_dir, STATE_FILE))
