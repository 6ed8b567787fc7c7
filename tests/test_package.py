"""cloudckpt/__init__.py: its three lists of the public names agree.

The package names each public name three times: ``__all__``; the mapping its PEP 562 ``__getattr__``
imports it by at first use (``_MODULES``; ``_LAZY`` for the TensorFlow adapters, imported through
``_frameworks.import_framework``); and the ``if TYPE_CHECKING:`` imports type checkers read. The exceptions
and ``__version__`` are imported with the package instead. Nothing else keeps the three in step: a name
added to one and not the others is missing at run time (``AttributeError``), to ``from cloudckpt import *``,
or to type checkers (``cloudckpt.X`` typed ``Any``, or an error under ``mypy --strict``).

The lists are read from the source (``ast``), as a type checker reads them; then each mapping is resolved
in this process. The TensorFlow adapters import TensorFlow here; that the other names do not is checked in
a fresh interpreter by test_cli's ``test_import_cloudckpt_loads_its_public_names_at_first_use``, and the
adapters' error without TensorFlow by test_without_tensorflow.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import types
from pathlib import Path

import pytest

import cloudckpt

INIT = Path(cloudckpt.__file__)


def _declared() -> dict[str, object]:
    """What ``cloudckpt/__init__.py`` declares at module level, read from its source: ``eager`` and
    ``type_checking`` (name -> the module it is imported from, relative: ``"catalog"``), the ``_LAZY`` and
    ``_MODULES`` dicts and the ``__all__`` list."""
    found: dict[str, object] = {"eager": {}, "type_checking": {}}
    for node in ast.parse(INIT.read_text(), str(INIT)).body:
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            for alias in node.names:
                found["eager"][alias.asname or alias.name] = node.module  # type: ignore[index]
        elif isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            for imported in node.body:
                if not (isinstance(imported, ast.ImportFrom) and imported.level == 1):
                    continue
                for alias in imported.names:
                    name = alias.asname or alias.name
                    assert name not in found["type_checking"], f"{name} imported twice under TYPE_CHECKING"
                    found["type_checking"][name] = imported.module  # type: ignore[index]
        elif (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)
              and node.targets[0].id in ("_LAZY", "_MODULES", "__all__")):
            found[node.targets[0].id] = ast.literal_eval(node.value)
    return found


DECLARED = _declared()
EAGER: dict[str, str] = DECLARED["eager"]  # type: ignore[assignment]
TYPE_CHECKING_IMPORTS: dict[str, str] = DECLARED["type_checking"]  # type: ignore[assignment]
ADAPTERS: dict[str, str] = DECLARED["_LAZY"]  # type: ignore[assignment]
MODULES: dict[str, str] = DECLARED["_MODULES"]  # type: ignore[assignment]
ALL: list[str] = DECLARED["__all__"]  # type: ignore[assignment]


def test_the_source_is_what_runs():
    """The lists read from the source are the package's (no other assignment changes them)."""
    assert (cloudckpt._LAZY, cloudckpt._MODULES, cloudckpt.__all__) == (ADAPTERS, MODULES, ALL)


def test_all_lazy_and_type_checking_name_the_same_names_from_the_same_modules():
    assert len(ALL) == len(set(ALL)), sorted(n for n in ALL if ALL.count(n) > 1)
    assert not set(ADAPTERS) & set(MODULES)
    lazy = {**ADAPTERS, **MODULES}
    assert not set(lazy) & set(EAGER), "imported at once and lazily"
    # every public name is reachable: imported with the package, or by __getattr__
    assert sorted(set(ALL) - set(lazy) - set(EAGER)) == []
    # every name __getattr__ imports (and type checkers are told of) is public
    assert sorted(set(lazy) - set(ALL)) == []
    assert sorted(set(TYPE_CHECKING_IMPORTS) - set(ALL)) == []
    # type checkers see each lazy name where __getattr__ imports it from
    assert {name: TYPE_CHECKING_IMPORTS.get(name) for name in lazy} == lazy
    # what is imported with the package (the exceptions, __version__) is public too
    assert sorted(n for n in EAGER if n not in ALL) == []


def test_a_public_name_that_is_also_a_submodule_is_kept_over_it():
    """``import cloudckpt.rollback`` must not rebind ``cloudckpt.rollback`` (the function) to the module:
    ``_Package`` keeps the names of ``_MODULES`` only, so no adapter (``_LAZY``) may share a submodule's name."""
    assert [n for n in ADAPTERS if importlib.util.find_spec(f"cloudckpt.{n}") is not None] == []
    shared = [n for n in MODULES if importlib.util.find_spec(f"cloudckpt.{n}") is not None]
    assert "rollback" in shared  # the case that exists: the function, next to its module
    for name in shared:
        importlib.import_module(f"cloudckpt.{name}")
        assert not isinstance(getattr(cloudckpt, name), types.ModuleType), name


@pytest.mark.parametrize("name", sorted(MODULES))
def test_each_lazy_name_is_the_object_of_its_module(name):
    """``__getattr__`` (called directly: a name looked up before is cached in the package) returns the
    object the mapped module defines or re-exports under that name, and so does ``cloudckpt.<name>``."""
    expected = getattr(importlib.import_module(f"cloudckpt.{MODULES[name]}"), name)
    assert cloudckpt.__getattr__(name) is expected
    assert getattr(cloudckpt, name) is expected


@pytest.mark.parametrize("name", sorted(ADAPTERS))
def test_each_tensorflow_adapter_is_the_object_of_its_module(name):
    pytest.importorskip("tensorflow")
    expected = getattr(importlib.import_module(f"cloudckpt.{ADAPTERS[name]}"), name)
    assert cloudckpt.__getattr__(name) is expected
    assert getattr(cloudckpt, name) is expected


@pytest.mark.parametrize("name", sorted(EAGER))
def test_each_name_imported_with_the_package_is_the_object_of_its_module(name):
    assert getattr(cloudckpt, name) is getattr(importlib.import_module(f"cloudckpt.{EAGER[name]}"), name)
