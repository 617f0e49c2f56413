"""Small x86-64 programs to run under an emulator with spte_fast as its MMU.

Each routine is a C file here, compiled with the system C compiler into flat,
freestanding code (no libc, no system calls; ``routine.ld`` puts ``_start`` from
``start.h`` at :data:`LOAD_GPA`): ``_start`` calls ``run(args)`` with ``rdi`` =
:data:`ARGS_GPA` and stops at a ``hlt`` (:data:`EXIT_GPA`).  The guest runs with paging
off, so every address below is guest-physical:

================  =====================================================================
0x1000            the code (:data:`LOAD_GPA`)
0x8000            the argument block, 16 words (:data:`ARGS_GPA`)
0x80000           the stack's top, growing down (:data:`STACK_TOP`)
0x100000 on       the routine's data (:data:`DATA_GPA`), :func:`data_bytes` long
================  =====================================================================

:func:`prepare` writes a routine's code, arguments and random input through a memory
object (anything with ``write(gpa, bytes)`` and ``read(gpa, n)``: an
:class:`~spte_fast.integrations.unicorn.Attachment`, or :class:`FlatMemory` for a plain
``Uc``), and the returned :class:`Prepared` checks the result the program left in memory
against numpy / Python.
"""
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent

#: Bundled routines and their default sizes (sort: integers; hash: keys, probed as many
#: times; matmul: N of N x N; list: nodes; invlpg: pages, loaded 16 times each with an
#: invlpg after every load -- a TLB miss per load, for measuring fills).
ROUTINES = {"sort": 1_000_000, "hash": 1 << 17, "matmul": 96, "list": 1 << 17,
            "invlpg": 4096}
INVLPG_ROUNDS = 16

LOAD_GPA = 0x1000
EXIT_GPA = LOAD_GPA + 5             # _start: a 5-byte call, then the hlt
ARGS_GPA = 0x8000
STACK_TOP = 0x80000
DATA_GPA = 0x100000

CFLAGS = ("-O2", "-ffreestanding", "-fno-builtin", "-fno-tree-loop-distribute-patterns",
          "-nostdlib", "-static", "-fno-pic", "-no-pie", "-fno-stack-protector",
          "-fcf-protection=none", "-fno-asynchronous-unwind-tables", "-mgeneral-regs-only")


def _tool(env, default):
    return os.environ.get(env) or default


def _cache_dir():
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "spte_fast" / "routines"


def build(name, cache_dir=None):
    """The flat binary of routine ``name`` (bytes), compiled with ``$CC`` (default ``cc``)
    and ``$OBJCOPY`` (default ``objcopy``) and cached by the hash of the sources, the
    flags and the compiler's version.  RuntimeError when no compiler can build it."""
    if name not in ROUTINES:
        raise ValueError(f"unknown routine {name!r}: one of {', '.join(ROUTINES)}")
    cc, objcopy = _tool("CC", "cc"), _tool("OBJCOPY", "objcopy")
    for tool in (cc, objcopy):
        if shutil.which(tool.split()[0]) is None:
            raise RuntimeError(f"building the bundled routines needs {tool!r} (a C compiler "
                               "and binutils for x86-64)")
    try:
        version = subprocess.run([*cc.split(), "--version"], capture_output=True, text=True,
                                 check=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        raise RuntimeError(f"{cc} --version failed: {e}") from e
    h = hashlib.sha256()
    for part in (f"{name}.c", "start.h", "routine.ld"):
        h.update((HERE / part).read_bytes())
    h.update(" ".join(CFLAGS).encode() + version.encode())
    out_dir = Path(cache_dir) if cache_dir is not None else _cache_dir()
    target = out_dir / f"{name}-{h.hexdigest()[:16]}.bin"
    if target.exists():
        return target.read_bytes()
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        elf, flat = Path(tmp) / f"{name}.elf", Path(tmp) / f"{name}.bin"
        cmd = [*cc.split(), *CFLAGS, f"-Wl,-T,{HERE / 'routine.ld'}", "-Wl,--build-id=none",
               "-o", str(elf), str(HERE / f"{name}.c")]
        for c in (cmd, [*objcopy.split(), "-O", "binary", str(elf), str(flat)]):
            p = subprocess.run(c, capture_output=True, text=True)
            if p.returncode != 0:
                raise RuntimeError(f"building routine {name!r} failed: {' '.join(c)}\n"
                                   f"{p.stderr}")
        os.replace(flat, target)
    return target.read_bytes()


def _pages(n):
    return (n + 4095) // 4096 * 4096


def data_bytes(name, size=None):
    """Bytes of data the routine uses from DATA_GPA on."""
    n = ROUTINES[name] if size is None else int(size)
    if name == "sort":
        return _pages(8 * n)
    if name == "hash":
        return _pages(8 * n) + _pages(16 << _hash_bits(n)) + _pages(8 * n)
    if name == "matmul":
        return 3 * _pages(8 * n * n)
    if name == "invlpg":
        return 4096 * n
    return _pages(64 * n)                   # list: 4 slots of 16 bytes per node


def memory_bytes(name, size=None):
    """Guest-physical memory a routine needs, from gpa 0 (a multiple of 2 MiB)."""
    end = DATA_GPA + data_bytes(name, size)
    return (end + (2 << 20) - 1) // (2 << 20) * (2 << 20)


def _hash_bits(n):
    return max(4, int(2 * n - 1).bit_length())      # a table of >= 2n slots


class FlatMemory:
    """A plain ``Uc``'s memory as the routines see it: guest-physical = the emulator's
    address (unicorn's own identity mapping)."""

    def __init__(self, uc):
        self.uc = uc

    def write(self, gpa, data):
        self.uc.mem_write(int(gpa), bytes(data))

    def read(self, gpa, size):
        return bytes(self.uc.mem_read(int(gpa), int(size)))


def _u64(mem, gpa, n):
    return np.frombuffer(mem.read(gpa, 8 * n), dtype=np.uint64).copy()


class Prepared:
    """A routine set up in memory: ``check(mem)`` raises AssertionError unless the program
    left the right result; ``registers`` are the rdi / rsp to start with."""

    def __init__(self, name, size, expect):
        self.name, self.size, self._expect = name, size, expect
        self.registers = {"rdi": ARGS_GPA, "rsp": STACK_TOP}

    def check(self, mem):
        self._expect(mem)


def prepare(mem, name, size=None, seed=0, code=None):
    """Write routine ``name``'s code (``code``, else :func:`build`), arguments and input."""
    n = ROUTINES[name] if size is None else int(size)
    if n < 1:
        raise ValueError(f"size must be at least 1, not {n}")
    rng = np.random.default_rng(seed)
    mem.write(LOAD_GPA, build(name) if code is None else code)
    args = np.zeros(16, dtype=np.uint64)

    if name == "sort":
        data = rng.integers(-(1 << 63), (1 << 63) - 1, n, dtype=np.int64, endpoint=True)
        mem.write(DATA_GPA, data.tobytes())
        args[:2] = (n, DATA_GPA)
        want = np.sort(data)

        def expect(m):
            got = np.frombuffer(m.read(DATA_GPA, 8 * n), dtype=np.int64)
            assert np.array_equal(got, want), f"sort: {int((got != want).sum())} misplaced"

    elif name == "hash":
        k = _hash_bits(n)
        keys = rng.integers(1, 1 << 63, n, dtype=np.uint64)
        probes = np.where(rng.random(n) < 0.5, keys[rng.integers(0, n, n)],
                          rng.integers(1, 1 << 63, n, dtype=np.uint64))
        table, probe_at = DATA_GPA + _pages(8 * n), DATA_GPA + _pages(8 * n) + _pages(16 << k)
        mem.write(DATA_GPA, keys.tobytes())
        mem.write(table, bytes(16 << k))
        mem.write(probe_at, probes.tobytes())
        args[:6] = (n, DATA_GPA, table, k, n, probe_at)
        first = {}
        for i, key in enumerate(keys.tolist()):
            first.setdefault(key, i)
        hits = [first[p] for p in probes.tolist() if p in first]
        want = (len(hits), sum(hits) % (1 << 64))

        def expect(m):
            got = tuple(int(v) for v in _u64(m, ARGS_GPA + 6 * 8, 2))
            assert got == want, f"hash: (found, sum) {got} != {want}"

    elif name == "matmul":
        a = rng.integers(-1000, 1000, (n, n), dtype=np.int64)
        b = rng.integers(-1000, 1000, (n, n), dtype=np.int64)
        step = _pages(8 * n * n)
        mem.write(DATA_GPA, a.tobytes())
        mem.write(DATA_GPA + step, b.tobytes())
        args[:4] = (n, DATA_GPA, DATA_GPA + step, DATA_GPA + 2 * step)
        want = a @ b

        def expect(m):
            got = np.frombuffer(m.read(DATA_GPA + 2 * step, 8 * n * n),
                                dtype=np.int64).reshape(n, n)
            assert np.array_equal(got, want), "matmul: C != A @ B"

    elif name == "list":
        slots = rng.choice(4 * n, n, replace=False)         # where each node lives
        addr = DATA_GPA + 16 * slots.astype(np.uint64)
        values = rng.integers(0, 1 << 32, n, dtype=np.uint64)
        nodes = np.zeros((4 * n, 2), dtype=np.uint64)
        nodes[slots, 0] = np.append(addr[1:], np.uint64(0))
        nodes[slots, 1] = values
        mem.write(DATA_GPA, nodes.tobytes())
        args[0] = addr[0]
        want = (n, int(values.sum(dtype=np.uint64)))

        def expect(m):
            got = tuple(int(v) for v in _u64(m, ARGS_GPA + 8, 2))
            assert got == want, f"list: (count, sum) {got} != {want}"

    elif name == "invlpg":
        words = rng.integers(0, 1 << 32, n, dtype=np.uint64)
        pages = np.zeros((n, 512), dtype=np.uint64)
        pages[:, 0] = words
        mem.write(DATA_GPA, pages.tobytes())
        args[:3] = (n, DATA_GPA, INVLPG_ROUNDS)
        want = INVLPG_ROUNDS * int(words.sum(dtype=np.uint64)) % (1 << 64)

        def expect(m):
            got = int(_u64(m, ARGS_GPA + 3 * 8, 1)[0])
            assert got == want, f"invlpg: sum {got} != {want}"

    else:
        raise ValueError(f"unknown routine {name!r}: one of {', '.join(ROUTINES)}")
    mem.write(ARGS_GPA, args.tobytes())
    return Prepared(name, n, expect)


def start(uc, prepared):
    """Set the registers a routine starts with (unicorn's x86-64 register ids)."""
    from unicorn import x86_const
    uc.reg_write(x86_const.UC_X86_REG_RDI, prepared.registers["rdi"])
    uc.reg_write(x86_const.UC_X86_REG_RSP, prepared.registers["rsp"])
