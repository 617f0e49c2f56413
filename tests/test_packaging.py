"""Build shape: the type stubs describe the compiled module (STYLE.md §3.7, PEP 561).

``spte_fast/_core.pyi`` is read with ``ast`` and held against the module itself: every
public name and every public attribute of every public class must be in the stub, and the
stub must name nothing the module lacks.  ``py.typed`` marks the package as typed.
"""
import ast
import os

import spte_fast as sf
from spte_fast import _core

STUB = os.path.join(os.path.dirname(sf.__file__), "_core.pyi")


def _stub():
    with open(STUB) as f:
        tree = ast.parse(f.read())
    names, classes = set(), {}
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            members = set()
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    members.add(item.name)
                elif isinstance(item, ast.AnnAssign):
                    members.add(item.target.id)
            classes[node.name] = members
            names.add(node.name)
        elif isinstance(node, ast.FunctionDef):
            names.add(node.name)
        elif isinstance(node, ast.AnnAssign):
            names.add(node.target.id)
    return names, classes


def test_py_typed_marker_ships():
    assert os.path.isfile(os.path.join(os.path.dirname(sf.__file__), "py.typed"))


def test_stub_names_exactly_the_modules_public_names():
    names, _ = _stub()
    public = set(_core.__all__)
    assert public <= names, f"missing from _core.pyi: {sorted(public - names)}"
    extra = names - public - {"U64Array"}          # U64Array: the stub's own alias
    assert not extra, f"in _core.pyi but not in _core.__all__: {sorted(extra)}"


def test_stub_classes_list_every_public_attribute():
    _, classes = _stub()
    for cls in (sf.SpteLayout, sf.PagePool, sf.MemoryCache, sf.Vm, sf.Vcpu):
        public = {n for n in dir(cls) if not n.startswith("_")}
        stub = classes[cls.__name__]
        assert public <= stub, f"{cls.__name__}: missing from the stub {sorted(public - stub)}"
        assert stub - {"__init__", "__len__"} <= public, \
            f"{cls.__name__}: the stub names {sorted(stub - public)}, which it lacks"


def test_the_bench_hooks_live_outside_the_product_module():
    """The C loops bench/ measures against are spte_fast._bench, not part of _core."""
    from spte_fast import _bench
    assert not [n for n in dir(_core) if "bench" in n.lower() or "bare" in n.lower()]
    assert {"fill_repeat", "cmpxchg_loop", "scan_repeat", "BareTdp"} <= set(dir(_bench))
