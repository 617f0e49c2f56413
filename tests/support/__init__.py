"""Helpers shared by the test files; the fixtures stay in ``tests/conftest.py``.

Everything here is derived from docs/API.md and KVM_MMU_SPEC.md, never from running the
code under test: tables are decoded from raw pool memory with the spec's bit positions,
not with the implementation's predicates.

* ``support.spec``: constants and geometry of the spec (§1.2, §2.1, §2.2) and the
  documented values of every API constant;
* ``support.layouts``: the layout kinds the suite parametrises over and the layout / Vm
  factories;
* ``support.tables``: reading the page tables straight out of ``vm.pool.pages``;
* ``support.snapshots``: "nothing changed" snapshots of a VM or of a cache and its pool,
  and stat deltas;
* ``support.threads``: starting callables on threads at once;
* ``support.cli``: running ``spte-fast`` in a subprocess, and a line-by-line oracle of the
  lackey trace conversion;
* ``support.child``: running code in a child interpreter, so that a crash or a hang fails
  one test instead of the whole session.

The test files import from the submodules (``from support.tables import linked_tables``);
``tests/`` is on ``sys.path`` because ``tests/conftest.py`` lives there (pytest's
rootdir-relative ``prepend`` import mode).
"""
