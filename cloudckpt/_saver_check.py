"""Can a TF1 Saver restore a checkpoint? Its variables compared with the checkpoint's index, no value read.

``cloudckpt.CheckpointSaverHook`` registers as the directory's writer in ``begin()``, before the session's
Saver restores the resume point. A graph the checkpoint does not fit (another model pointed at the same
directory) would fail there only after registering, fencing the job writing the directory. The hook runs
``restore_mismatches`` first, on the names, dtypes and shapes the Saver would restore.

What counts is what TF's restore would refuse, or get wrong: a variable the checkpoint lacks
(``NotFoundError``), another dtype (``InvalidArgumentError``), another shape -- refused for reference
variables and sliced (partitioned) ones, while a resource variable takes a value of another shape
silently (the graph then fails at the first step, or computes with it). A Saver built with
``reshape=True`` takes another shape of as many elements.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import tensorflow as tf

try:  # TF's own naming of what a Saver saves (private modules: without them nothing is checked)
    from tensorflow.python.ops import variables as tf_variables
    from tensorflow.python.trackable import base as trackable
    from tensorflow.python.training.saving import saveable_object, saveable_object_util
    from tensorflow.python.util import nest
    _NAMING = True
except ImportError:  # pragma: no cover (a TF that moved them)
    _NAMING = False

__all__ = ["Mismatch", "restore_mismatches", "restoring_var_list"]


@dataclass(frozen=True)
class Mismatch:
    """A checkpoint entry the Saver needs that the checkpoint lacks (``checkpoint`` None) or holds otherwise."""

    name: str               # the key in the checkpoint (a partitioned variable's full name)
    graph: str              # "float32 [64]"
    checkpoint: str | None  # "float32 [32]"; None: not in the checkpoint

    def __str__(self) -> str:
        if self.checkpoint is None:
            return f"{self.name!r} ({self.graph}) is not in the checkpoint"
        return f"{self.name!r} is {self.graph} in the graph, {self.checkpoint} in the checkpoint"


def restoring_var_list(saver: Any, graph: tf.Graph) -> tuple[list[Any] | dict[str, Any], bool] | None:
    """What ``saver`` restores and its ``reshape`` option; ``saver`` None: the default Saver
    ``Scaffold.finalize`` builds (global variables and ``SAVEABLE_OBJECTS``). None when that is not known:
    a Saver made from a ``SaverDef`` (``import_meta_graph``), one that is not a TF Saver, or a TF whose
    private modules naming a Saver's entries moved."""
    if not _NAMING:
        return None
    if saver is None:
        return _all_saveable_objects(graph), False
    if not isinstance(saver, tf.compat.v1.train.Saver):
        return None
    var_list = getattr(saver, "_var_list", None)
    if var_list is None:
        if saver.saver_def is not None:  # built from a SaverDef: only its ops know the variables
            return None
        var_list = _all_saveable_objects(graph)  # defer_build: Scaffold.finalize builds it with these
    return var_list, bool(getattr(saver, "_reshape", False))


def restore_mismatches(var_list: list[Any] | dict[str, Any], prefix: str, *, reshape: bool = False) -> list[Mismatch]:
    """The entries a Saver of ``var_list`` would restore from checkpoint ``prefix`` that the checkpoint lacks
    or holds with another dtype or shape, in checkpoint-name order. Reads the checkpoint's ``.index`` only.

    Raises:
        tf.errors.OpError: the checkpoint cannot be read.
    """
    reader = tf.compat.v1.train.NewCheckpointReader(prefix)
    shapes = reader.get_variable_to_shape_map()
    dtypes = reader.get_variable_to_dtype_map()
    found, seen = [], set()
    for name, dtype, shape, sliced in _entries(var_list):
        if name in seen:  # the other slices of a partitioned variable
            continue
        seen.add(name)
        graph = f"{dtype.name} {_show(shape)}"
        if name not in shapes:
            found.append(Mismatch(name, graph, None))
            continue
        ckpt_shape = tf.TensorShape(shapes[name])
        ckpt_dtype = tf.as_dtype(dtypes[name]).base_dtype
        if ckpt_dtype != dtype or (shape is not None and not _fits(shape, ckpt_shape, reshape and not sliced)):
            found.append(Mismatch(name, graph, f"{ckpt_dtype.name} {_show(ckpt_shape)}"))
    return found


def _fits(graph: tf.TensorShape, checkpoint: tf.TensorShape, reshape: bool) -> bool:
    if reshape:  # TF reshapes the value to the variable's shape
        return None in (graph.num_elements(), checkpoint.num_elements()) or \
            graph.num_elements() == checkpoint.num_elements()
    return graph.is_compatible_with(checkpoint)


def _show(shape: tf.TensorShape | None) -> str:
    if shape is None or shape.rank is None:
        return "[?]" if shape is None else "<unknown shape>"
    return "[" + ", ".join("?" if d is None else str(d) for d in shape.as_list()) + "]"


def _entries(var_list: list[Any] | dict[str, Any]) -> Iterator[tuple[str, tf.DType, tf.TensorShape | None, bool]]:
    """(checkpoint name, dtype, shape or None when not checked, sliced) of each tensor the Saver restores,
    named as TF's Saver names them (``op_list_to_dict``, ``validate_and_slice_inputs``): a partitioned
    variable under its full name and full shape. Objects whose saveables would be built by running code
    that adds ops to the graph (trackables other than variables, e.g. lookup tables) are left out."""
    if isinstance(var_list, dict):
        names_to_saveables = {k: v for k, v in var_list.items() if not _builds_ops(v)}
    else:
        names_to_saveables = saveable_object_util.op_list_to_dict(
            [v for v in nest.flatten(list(var_list)) if not _builds_ops(v)])
    for saveable in saveable_object_util.validate_and_slice_inputs(names_to_saveables):
        variable = isinstance(saveable, (saveable_object_util.ReferenceVariableSaveable,
                                         saveable_object_util.ResourceVariableSaveable))
        for spec in saveable.specs:
            dtype = tf.as_dtype(spec.dtype).base_dtype
            if spec.slice_spec:  # "<full shape dims> <slice>": the checkpoint holds the full tensor
                yield spec.name, dtype, tf.TensorShape([int(d) for d in spec.slice_spec.split()[:-1]]), True
            else:
                yield spec.name, dtype, (tf.TensorShape(saveable.op.shape) if variable else None), False


def _builds_ops(value: Any) -> bool:
    return (isinstance(value, trackable.Trackable)
            and not isinstance(value, (tf_variables.Variable, tf_variables.PartitionedVariable,
                                       saveable_object.SaveableObject)))


def _all_saveable_objects(graph: tf.Graph) -> list[Any]:
    """What ``Saver()`` saves without ``var_list`` (TF's ``variables._all_saveable_objects``)."""
    return (graph.get_collection(tf.compat.v1.GraphKeys.GLOBAL_VARIABLES)
            + graph.get_collection(tf.compat.v1.GraphKeys.SAVEABLE_OBJECTS))
