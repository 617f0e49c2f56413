"""The simulator behind ``spte-fast``, usable without the command line.

``engine`` runs a ``SimConfig`` over a source and returns a ``SimResult``; ``workloads``
makes sources (the built-in workloads, trace replay); ``trace`` reads, validates and
converts trace files; ``report`` turns a result into the text summary, JSON or a plot;
``errors`` holds the exceptions (``InputError``: nothing ran; ``RunError``: the run
failed).  Nothing here imports the command line or argparse.

    from spte_fast import sim
    with sim.trace_source("trace.bin.xz") as src:
        res = sim.run(sim.SimConfig(vcpus=2), src)
    print(sim.report.summary(res))
"""
from . import engine, errors, report, trace, workloads
from .engine import Sample, SimConfig, SimResult, run
from .errors import (AuditFailed, HostMemoryError, InputError, RunError, SimError,
                     TraceError)
from .workloads import Source, trace_source, workload

__all__ = ["engine", "errors", "report", "trace", "workloads", "Sample", "SimConfig",
           "SimResult", "run", "AuditFailed", "HostMemoryError", "InputError", "RunError",
           "SimError", "TraceError", "Source", "trace_source", "workload"]
