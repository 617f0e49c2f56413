"""Shared fixtures for the spte_fast test suite.

* ``impl``: the module under test, parametrised over the pure-Python oracle
  (``spte_fast.reference``, id ``reference``) and the Cython engine
  (``spte_fast``, id ``fast``).  Every behaviour test takes it, so one suite
  checks both implementations (STYLE.md §3.7).  The fixture is session-scoped:
  a module is stateless, and hypothesis refuses function-scoped fixtures.
* ``fast`` / ``reference``: both modules at once, for the tests that compare
  them directly.
* ``seed``: 42 by default; ``SPTE_FAST_TEST_SEED=all`` runs seeds 0..99,
  ``SPTE_FAST_TEST_SEED=<n>`` runs seed n.
* ``poison`` / ``poisoned_pool``: a pool whose fresh pages hold non-zero
  garbage, so that any path relying on fresh memory being 0 fails.
* hypothesis profiles ``dev`` (few examples), ``ci`` (default) and ``debug``
  (verbose), chosen by ``HYPOTHESIS_PROFILE``.

Helpers that are not fixtures (constants of the spec, layout and VM factories, table
decoding, snapshots, thread and child-process runners) are in ``tests/support/``.
"""
import importlib
import os

import pytest
from hypothesis import HealthCheck, Verbosity, settings

from support.spec import POISON

# --------------------------------------------------------------------------
# Hypothesis profiles
# --------------------------------------------------------------------------

settings.register_profile("dev", max_examples=10, deadline=None)
settings.register_profile(
    "ci",
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "debug",
    max_examples=10,
    deadline=None,
    verbosity=Verbosity.verbose,
    print_blob=True,
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# --------------------------------------------------------------------------
# Implementations
# --------------------------------------------------------------------------

IMPLS = ("reference", "fast")


def load_impl(name):
    """Return the module implementing the API for ``name``.

    For ``fast`` the compiled core is imported explicitly: ``spte_fast``
    itself imports even when ``_core`` is missing (a development-only
    fallback), and a test must then fail loudly rather than run against a
    module with half its names.
    """
    if name == "reference":
        return importlib.import_module("spte_fast.reference")
    if name == "fast":
        importlib.import_module("spte_fast._core")
        return importlib.import_module("spte_fast")
    raise ValueError(name)


@pytest.fixture(scope="session", params=IMPLS)
def impl(request):
    """The implementation under test: ``spte_fast.reference`` or ``spte_fast``."""
    return load_impl(request.param)


@pytest.fixture(scope="session")
def reference():
    return load_impl("reference")


@pytest.fixture(scope="session")
def fast():
    return load_impl("fast")


# --------------------------------------------------------------------------
# Seeds for non-hypothesis randomised tests
# --------------------------------------------------------------------------


def _seeds():
    raw = os.environ.get("SPTE_FAST_TEST_SEED", "42")
    if raw == "all":
        return list(range(100))
    return [int(raw)]


@pytest.fixture(params=_seeds(), ids=lambda s: f"seed{s}")
def seed(request):
    """Seed for numpy.random.default_rng in non-hypothesis randomised tests."""
    return request.param


# --------------------------------------------------------------------------
# Pools
# --------------------------------------------------------------------------


@pytest.fixture(scope="session")
def poison():
    """The 64-bit garbage value of a poisoned pool."""
    return POISON


def make_poisoned_pool(impl, n):
    """``impl.PagePool(n, poison=0xAAAA_AAAA_AAAA_AAAA)``."""
    return impl.PagePool(n, poison=POISON)


@pytest.fixture
def poisoned_pool(impl):
    """Factory: ``poisoned_pool(n)`` is a poisoned ``impl.PagePool`` of n pages."""
    return lambda n: make_poisoned_pool(impl, n)


def pytest_configure(config):
    # Hypothesis' failure report imports a module that triggers mypy_extensions'
    # own DeprecationWarning; with the project's filterwarnings = ["error"] that
    # turned every falsified example into an INTERNALERROR instead of a report.
    config.addinivalue_line(
        "filterwarnings", "ignore:mypy_extensions.TypedDict is deprecated:DeprecationWarning"
    )
