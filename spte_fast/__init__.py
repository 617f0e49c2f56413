"""spte_fast: the Linux KVM x86 MMU's SPTEs (TDP MMU, Linux 6.10), modelled fast.

The public names come from the Cython core ``spte_fast._core``; the pure-Python
oracle with the same API is ``spte_fast.reference`` (not imported here).  The
contract both follow is docs/API.md.
"""
from ._core import *  # noqa: F401,F403
from ._core import __all__ as _core_all
from .errors import AuditError, CacheConfigError, OutOfMemory, SpteError
from .guest import GuestPageTables
from .pf import PF

__version__ = "0.1.0"


def get_include():
    """The directory of the C headers that ``spte_fast/_core.pxd`` needs: pass it (with
    ``numpy.get_include()``) as ``include_dirs`` when building an extension that
    cimports spte_fast."""
    import os
    return os.path.join(os.path.dirname(__file__), "include")


__all__ = ["AuditError", "CacheConfigError", "GuestPageTables", "OutOfMemory", "SpteError", "PF",
           "get_include", *_core_all]
