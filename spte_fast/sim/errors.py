"""The simulator's errors: bad input (nothing ran) versus a run that failed.

``SimError`` is the root.  ``InputError`` (also a ``ValueError``) is what the caller got
wrong -- a configuration value, a guest that does not fit the address width, memslots the
engine refuses, a malformed trace (``TraceError``) -- and is raised before any fault runs.
``RunError`` is a run that started and failed: the page-table pool ran out, the host had
not enough memory for the guest (``HostMemoryError``), or the final ``vm.audit()`` failed
(``AuditFailed``).  The command line maps the first family to exit status 2 and the
second to 1; the messages are the ones it prints.
"""


class SimError(Exception):
    """Root of the simulator's errors."""


class InputError(SimError, ValueError):
    """Bad configuration or input; raised before any fault runs."""


class TraceError(InputError):
    """A malformed lackey log or binary trace (the message names the file and place)."""


class RunError(SimError):
    """The run itself failed (pool exhausted, host memory, audit)."""


class HostMemoryError(RunError):
    """Not enough host memory for the guest's page-table pool or memslot page flags."""

    def __init__(self, guest_bytes, faults):
        super().__init__(f"not enough host memory to simulate a guest of {guest_bytes} "
                         f"bytes with {faults} faults")
        self.guest_bytes = guest_bytes
        self.faults = faults


class AuditFailed(RunError):
    """``vm.audit()`` found a broken invariant after the run (``invariant`` names it)."""

    def __init__(self, message, invariant):
        super().__init__(message)
        self.invariant = invariant
