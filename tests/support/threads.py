"""Starting callables on threads at once (the engine's vCPUs may fault from their own
Python threads: docs/API.md "Concurrency"; the reference model is single-threaded)."""
import threading


def run_threads(targets, timeout=60):
    """Start every target at once (barrier), join; returns [(result, exception)] in order."""
    barrier = threading.Barrier(len(targets))
    results = [None] * len(targets)

    def wrap(i, fn):
        def run():
            try:
                barrier.wait(timeout=timeout)
                results[i] = (fn(), None)
            except BaseException as e:  # noqa: BLE001 - returned to the test
                results[i] = (None, e)
        return run

    threads = [threading.Thread(target=wrap(i, fn)) for i, fn in enumerate(targets)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=timeout)
        assert not t.is_alive(), "a thread did not finish (deadlock?)"
    return results


def run_threads_or_raise(targets, timeout=120):
    """Start every target at once, join, re-raise the first error."""
    for _, error in run_threads(targets, timeout=timeout):
        if error is not None:
            raise error
