"""``python -m spte_fast``: the ``spte-fast`` command (see ``spte_fast.cli``).

With no command it runs ``demo``: one memory cache topped up on each of KVM 6.10's two
initialisation paths (GFP_ZERO for a non-present value of 0, memset64 fill for bit 63),
then a guest faulted through a VM on each layout, printing what each did.
"""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
