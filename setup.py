"""Build the engine, spte_fast._core, the bench hooks, spte_fast._bench, the simulator's
working-set pass, spte_fast.sim._distinct, and unicorn's TLB-fill callback,
spte_fast.integrations._unicorn (no unicorn needed to build it: see that file).

Compiler directives live here and nowhere else.  ``SPTE_FAST_DEBUG=1`` turns the
checks back on (bounds, wraparound, initialized), adds line tracing and builds
with ``-O0 -g``; the release build is ``-O3`` with portable flags (no
``-march=native``: set ``SPTE_FAST_CFLAGS`` to add your own, e.g. for a local
benchmark).  ``_core`` is one extension assembled from spte_fast/core/*.pxi, so the
fault path makes no cross-module calls; ``_bench`` cimports it as any embedder would.
"""
import os

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup

DEBUG = os.environ.get("SPTE_FAST_DEBUG", "") not in ("", "0")

DIRECTIVES = dict(
    language_level=3,
    boundscheck=DEBUG,
    wraparound=DEBUG,
    initializedcheck=DEBUG,
    nonecheck=False,
    cdivision=True,
    embedsignature=True,
    linetrace=DEBUG,
)

macros = [("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")]
if DEBUG:
    macros += [("CYTHON_TRACE_NOGIL", "1"), ("SPTE_FAST_DEBUG", "1")]
    cflags = ["-O0", "-g"]
else:
    cflags = ["-O3"]
cflags += os.environ.get("SPTE_FAST_CFLAGS", "").split()
INCLUDE = [numpy.get_include(), os.path.join("spte_fast", "include")]


def extension(name):
    path = name.replace(".", "/")
    return Extension(f"spte_fast.{name}", [f"spte_fast/{path}.pyx"], include_dirs=INCLUDE,
                     define_macros=macros, extra_compile_args=cflags)


setup(ext_modules=cythonize([extension("_core"), extension("_bench"),
                             extension("sim._distinct"), extension("integrations._unicorn")],
                            compiler_directives=DIRECTIVES, annotate=DEBUG))
