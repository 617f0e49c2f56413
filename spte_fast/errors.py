"""The exception hierarchy shared by the engine and the reference model."""


class SpteError(Exception):
    """Root of every error spte_fast raises on purpose."""


class OutOfMemory(SpteError, MemoryError):
    """The page pool could not supply the pages asked for (KVM's -ENOMEM).

    ``completed`` is set by batch entry points: how many items finished
    before the pool ran dry.
    """

    def __init__(self, *args, completed=None):
        super().__init__(*args)
        self.completed = completed


class CacheConfigError(SpteError, ValueError):
    """A memory-cache top-up that KVM refuses with WARN + -EIO."""


class AuditError(SpteError, AssertionError):
    """A broken invariant (also KVM's BUG() cases). ``invariant`` names it."""

    def __init__(self, *args, invariant=None):
        super().__init__(*args)
        self.invariant = invariant
