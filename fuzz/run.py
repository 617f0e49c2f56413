"""Drive the fuzz targets: ``python -m fuzz.run TARGET [options]``.

    --atheris        coverage-guided, with atheris (pip install 'spte_fast[fuzz]'); the
                     remaining arguments go to libFuzzer (e.g. -runs=100000 -max_len=512
                     -timeout=10, a corpus directory)
    --runs N         random-bytes driver (no atheris): N inputs from --seed (default 0),
                     lengths up to --max-len (default 512); stops at the first finding,
                     prints the input as hex and exits 1

A finding is ``fuzz.targets.Finding`` or any exception a target does not expect; a crash
(a signal) ends the process, which is why the test suite runs this in a child process.
"""
import argparse
import random
import sys
import time
import traceback


def _random_driver(target, runs, seed, max_len, name):
    rng = random.Random(seed)
    t0 = time.perf_counter()
    for i in range(runs):
        n = rng.randrange(max_len + 1)
        data = rng.randbytes(n)
        try:
            target(data)
        except Exception:
            traceback.print_exc()
            print(f"FINDING in {name} at run {i} (seed {seed}): input {data.hex()}")
            return 1
    dt = time.perf_counter() - t0
    print(f"{name}: {runs} runs, seed {seed}, no finding ({dt:.1f} s, {runs / dt:.0f}/s)")
    return 0


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m fuzz.run")
    p.add_argument("target", choices=["api", "trace", "cli"])
    p.add_argument("--atheris", action="store_true")
    p.add_argument("--runs", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-len", type=int, default=512)
    args, rest = p.parse_known_args(argv)
    if args.atheris:
        import atheris
        # Instrument the Python code the targets reach (the compiled core itself is not:
        # it is built without libFuzzer's instrumentation).  Imported here, inside the
        # context, because instrumentation happens at import.
        with atheris.instrument_imports(include=["spte_fast", "fuzz.targets",
                                                 "fuzz.bytes_reader"]):
            import spte_fast  # noqa: F401
            import spte_fast.cli  # noqa: F401
            import spte_fast.reference  # noqa: F401
            import spte_fast.sim.trace  # noqa: F401
            from fuzz import targets
        target = targets.TARGETS[args.target]
        atheris.Setup([sys.argv[0]] + rest, target)
        atheris.Fuzz()
        return 0
    from fuzz import targets
    return _random_driver(targets.TARGETS[args.target], args.runs, args.seed, args.max_len,
                          args.target)


if __name__ == "__main__":
    sys.exit(main())
