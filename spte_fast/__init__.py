"""spte_fast: the Linux KVM x86 MMU's SPTEs (TDP MMU, Linux 6.10), modelled fast.

The public names come from the Cython core ``spte_fast._core``; the pure-Python
oracle with the same API is ``spte_fast.reference`` (not imported here).  The
contract both follow is docs/API.md.
"""
from ._core import *  # noqa: F401,F403
from ._core import __all__ as _core_all
from .errors import AuditError, CacheConfigError, OutOfMemory, SpteError
from .pf import PF

__version__ = "0.1.0"
__all__ = ["AuditError", "CacheConfigError", "OutOfMemory", "SpteError", "PF", *_core_all]
