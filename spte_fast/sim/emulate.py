"""``spte-fast emulate``: run real x86-64 code under unicorn with spte_fast as its MMU.

``run(EmulateConfig(program="sort"))`` builds a VM (one memslot from gpa 0 at host pfn
:data:`HOST_PFN`), attaches its vCPU to a fresh ``Uc``
(:func:`spte_fast.integrations.unicorn.attach`), runs the program and audits the VM.
``program`` is a bundled routine (:data:`spte_fast.integrations.routines.ROUTINES`: its
input is generated from ``seed`` and its result checked in emulated memory), or the path of
a flat x86-64 binary, loaded at 0x1000 and entered there with ``rsp`` = 0x80000 and ``rdi``
= 0x8000, that runs until it executes ``hlt`` (or reaches 0x1001, emu_start's ``until``).

``guest_paging="tdp"`` runs the guest with paging on: a :class:`spte_fast.GuestPageTables`
(4-level, frames after the program's memory) maps all guest memory at the same virtual
addresses with 2M pages, as a boot loader would, and every fill is a two-dimensional walk.

Instructions executed are counted on a second run of the same program and input on
unicorn alone (a C ``UC_HOOK_CODE`` counter triples the time of the run it is on, so the
timed run has none); ``count_instructions=False`` skips it.
"""
import dataclasses
import os
import time

from .errors import InputError, RunError
from .report import format_bytes, mmu_rows

HOST_PFN = 0x100000                 # guest RAM at host physical 4 GiB
FLAT_GUEST_BYTES = 64 << 20
GUEST_TABLE_FRAMES = 64             # guest page-table frames (guest paging on)
MAX_GUEST_BYTES = 16 << 30          # unicorn maps (and numpy builds) all of it
KINDS = ("read", "write", "fetch")
TITLE = "spte-fast emulate"


@dataclasses.dataclass
class EmulateConfig:
    program: str = "sort"            # a bundled routine's name, or a flat binary's path
    size: int = None                 # the routine's size (its default when None)
    seed: int = 0
    layout: str = "ept"
    root_level: int = 4
    max_level: int = 3               # KVM's default: 1G
    callback: str = "c"
    guest_bytes: int = None          # a flat binary's guest RAM (default 64 MiB)
    timeout_s: float = 60.0          # a flat binary's time limit (0: none)
    count_instructions: bool = True
    guest_paging: str = "none"       # "none" (paging off) or "tdp" (two-dimensional walks)


@dataclasses.dataclass
class EmulateResult:
    config: EmulateConfig
    routine: bool                    # a bundled routine (its result checked)
    guest_bytes: int
    nonpresent_value: int
    seconds: float                   # the emulated run's wall time
    instructions: int                # None when not counted
    fills: dict                      # Attachment.stats
    stats: dict                      # vm.stats at the end
    hardware: dict                   # the vCPU's walks, A/D sets, exits
    results: dict                    # the exits' results: fixed, fast, spurious, emulate, retry
    check: str
    audit: str

    def to_dict(self):
        c = self.config
        return {
            "config": {"program": c.program, "routine": self.routine, "size": c.size,
                       "seed": c.seed, "layout": c.layout,
                       "nonpresent_value": hex(self.nonpresent_value),
                       "root_level": c.root_level, "max_level": ("4k", "2m", "1g")[c.max_level - 1],
                       "callback": c.callback, "guest_bytes": self.guest_bytes,
                       "guest_paging": c.guest_paging, "host_pfn": HOST_PFN},
            "seconds": self.seconds,
            "instructions": self.instructions,
            "instructions_per_s": (self.instructions / self.seconds
                                   if self.instructions and self.seconds else None),
            "tlb_fills": self.fills,
            "hardware": self.hardware,
            "results": self.results,
            "stats": self.stats,
            "check": self.check,
            "audit": self.audit,
        }


def _load(config):
    """(code bytes, routine?) of the program; InputError for what cannot run."""
    from ..integrations import routines
    if config.program in routines.ROUTINES:
        if config.guest_bytes is not None:
            raise InputError("--guest-size applies to a flat binary (a routine sizes its "
                             "own memory)")
        try:
            return routines.build(config.program), True
        except RuntimeError as e:
            raise RunError(str(e)) from None
    if not os.path.isfile(config.program):
        raise InputError(f"{config.program!r} is neither a bundled routine "
                         f"({', '.join(routines.ROUTINES)}) nor a file")
    if config.size is not None:
        raise InputError("--size applies to the bundled routines, not to a flat binary")
    with open(config.program, "rb") as f:
        code = f.read()
    if not code:
        raise InputError(f"{config.program}: empty program")
    return code, False


def _guest_bytes(config, routine, code):
    from ..integrations import routines
    if routine:
        return routines.memory_bytes(config.program, config.size)
    need = routines.LOAD_GPA + len(code)
    gb = FLAT_GUEST_BYTES if config.guest_bytes is None else int(config.guest_bytes)
    if gb < max(need, routines.STACK_TOP) or gb % 4096:
        raise InputError(f"a guest of {gb} bytes cannot hold the program and its stack "
                         f"(at least {max(need, routines.STACK_TOP):#x}, whole pages)")
    return gb


def _count_instructions(code, name, size, seed, guest_bytes, flat_until, timeout_us):
    """Instructions the program executes, on unicorn alone (RAM at gpa 0)."""
    from unicorn import Uc, unicorn_const as UC

    from ..integrations import _unicorn, routines
    from ..integrations import unicorn as sfu
    uc = Uc(UC.UC_ARCH_X86, UC.UC_MODE_64)
    uc.mem_map(0, guest_bytes)
    mem = routines.FlatMemory(uc)
    counter = _unicorn.InstructionCounter()
    if name is not None:
        routines.start(uc, routines.prepare(mem, name, size, seed=seed, code=code))
        until = routines.EXIT_GPA
    else:
        _flat_start(uc, mem, code)
        until = flat_until
    sfu.hook_c(uc, UC.UC_HOOK_CODE, counter)
    try:
        uc.emu_start(routines.LOAD_GPA, until, timeout_us)
    except Exception:
        return None
    return counter.count


def _flat_start(uc, mem, code):
    from unicorn import x86_const

    from ..integrations import routines
    mem.write(routines.LOAD_GPA, code)
    uc.reg_write(x86_const.UC_X86_REG_RDI, routines.ARGS_GPA)
    uc.reg_write(x86_const.UC_X86_REG_RSP, routines.STACK_TOP)


def run(config):
    """Run the program with spte_fast as the MMU; an EmulateResult.  InputError before
    anything runs; RunError when the guest faults, the model fails or the audit does."""
    from .engine import LAYOUTS
    if config.layout not in LAYOUTS:
        raise InputError(f"unknown layout {config.layout!r}: one of {', '.join(LAYOUTS)}")
    if config.callback not in ("c", "python"):
        raise InputError(f"callback must be c or python, not {config.callback!r}")
    if config.guest_paging not in ("none", "tdp"):
        raise InputError(f"guest paging {config.guest_paging!r}: none or tdp (shadow paging "
                         "needs the shadow MMU, not built yet)")
    try:
        from unicorn import Uc, UcError, unicorn_const as UC
    except ImportError:
        raise InputError("emulate needs unicorn: pip install 'spte_fast[unicorn]'") from None
    import spte_fast as sf

    from ..integrations import routines
    from ..integrations import unicorn as sfu
    code, routine = _load(config)
    guest_bytes = _guest_bytes(config, routine, code)
    if guest_bytes > MAX_GUEST_BYTES:
        raise InputError(f"the run needs {format_bytes(guest_bytes)} of guest memory; "
                         f"emulate maps at most {format_bytes(MAX_GUEST_BYTES)} (a smaller "
                         "--size or --guest-size)")
    layout = LAYOUTS[config.layout][1]()
    try:
        vm = sf.Vm(layout, root_level=config.root_level, max_level=config.max_level)
    except ValueError as e:
        raise InputError(str(e)) from None
    tables = GUEST_TABLE_FRAMES if config.guest_paging == "tdp" else 0
    vm.add_memslot(0, (guest_bytes >> 12) + tables, HOST_PFN)
    vcpu = vm.vcpu()
    guest = None
    if tables:
        guest = sf.GuestPageTables(vm, table_gfns=(guest_bytes >> 12,
                                                   (guest_bytes >> 12) + tables))
        for g in range(0, guest_bytes >> 12, 512):          # the same addresses, 2M pages
            guest.map(g << 12, g, level=2)
    uc = Uc(UC.UC_ARCH_X86, UC.UC_MODE_64)
    try:
        att = sfu.attach(uc, vcpu, callback=config.callback, guest=guest)
    except UcError as e:
        raise RunError(f"unicorn could not map {format_bytes(guest_bytes)} of guest RAM: "
                       f"{e}") from None
    timeout_us = int(config.timeout_s * 1e6) if not routine and config.timeout_s else 0
    # A flat binary stops at its hlt.  unicorn then looks up the page of emu_start's
    # `until` address (a fetch fill), so `until` is inside the code's first page: no fill
    # that the program did not make.
    flat_until = routines.LOAD_GPA + 1
    if routine:
        prepared = routines.prepare(att, config.program, config.size, seed=config.seed,
                                    code=code)
        routines.start(uc, prepared)
        until = routines.EXIT_GPA
    else:
        _flat_start(uc, att, code)
        until = flat_until
    t0 = time.perf_counter()
    try:
        att.emu_start(routines.LOAD_GPA, until, timeout_us)
    except sf.SpteError as e:
        raise RunError(f"the model failed during the run: {e}") from None
    except UcError as e:
        from unicorn import x86_const
        rip = uc.reg_read(x86_const.UC_X86_REG_RIP)
        why = att.fault
        raise RunError(f"the guest stopped at rip {rip:#x}: {e}" +
                       (f" (the first fill answered with a fault: {why[1]} of {why[0]:#x}, "
                        f"{why[2]})" if why else "")) from None
    seconds = time.perf_counter() - t0
    check = "not checked (a flat binary)"
    if routine:
        try:
            prepared.check(att)
        except AssertionError as e:
            raise RunError(f"wrong result in emulated memory: {e}") from None
        check = "right (checked against numpy / Python)"
    fills = att.stats
    att.detach()
    try:
        vm.audit()
    except sf.AuditError as e:
        raise RunError(f"audit failed: {e}") from None
    vst = vcpu.stats
    instructions = None
    if config.count_instructions:
        instructions = _count_instructions(code, config.program if routine else None,
                                           config.size, config.seed, guest_bytes,
                                           flat_until, timeout_us)
    results = {"fixed": vst["faults_fixed"], "fast": vst["faults_fast"],
               "spurious": vst["faults_spurious"], "emulate": vst["faults_emulate"],
               "retry": vst["faults_retry"]}
    hardware = {k: vst[k] for k in ("hw_walks", "hw_ad_sets", "exits_ept_violation",
                                    "exits_misconfig", "exits_pml_full", "guest_walks",
                                    "guest_walk_refs", "guest_faults", "guest_ad_sets")}
    if routine and config.size is None:
        config = dataclasses.replace(config, size=routines.ROUTINES[config.program])
    return EmulateResult(config, routine, guest_bytes, layout.nonpresent_value, seconds,
                         instructions, fills, dict(vm.stats), hardware, results, check,
                         "passed")


def summary(result, title=TITLE):
    """The text report: the run, the TLB fills, then what KVM did (as ``simulate``)."""
    d = result.to_dict()
    c, f, hw = d["config"], d["tlb_fills"], d["hardware"]
    what = (f"routine {c['program']} (size {c['size']:,})" if c["routine"]
            else f"flat binary {c['program']}")
    paging = ("guest paging off" if c["guest_paging"] == "none" else
              "guest paging on (4-level, 2M pages; two-dimensional walks)")
    head = (f"{title}: {what}, {format_bytes(c['guest_bytes'])} guest in 1 memslot, "
            f"{paging}\nlayout {c['layout']} (non-present {c['nonpresent_value']}), "
            f"{c['root_level']}-level root, max level {c['max_level'].upper()}, "
            f"{c['callback']} callback, seed {c['seed']}\n")
    if d["instructions"] is not None:
        ins = (f"{d['instructions']:,} in {d['seconds']:.3f} s: "
               f"{d['instructions_per_s'] / 1e6:.1f} M instructions/s (counted on a second "
               "run, unicorn alone)")
    else:
        ins = f"not counted; the run took {d['seconds']:.3f} s"
    rows = [
        ("result", result.check),
        ("instructions", ins),
        ("TLB fills", f"{f['tlb_fills']:,}   " + "   ".join(
            f"{k} {f['tlb_fills_' + k]:,}" for k in KINDS) +
            f"   answered with a fault {f['fills_denied']:,}"),
        ("walks", f"page walks {hw['hw_walks']:,}   A/D bits set by the CPU "
                  f"{hw['hw_ad_sets']:,}   fills that exited {f['fill_exits']:,}"),
        ("exits", f"EPT violation / #NPF {hw['exits_ept_violation']:,}   "
                  f"misconfiguration / RSVD {hw['exits_misconfig']:,}   PML full "
                  f"{hw['exits_pml_full']:,}"),
    ]
    if c["guest_paging"] != "none":
        gw = hw["guest_walks"]
        rows.append(("guest walks", f"{gw:,}   memory references {hw['guest_walk_refs']:,}"
                                    f" ({hw['guest_walk_refs'] / max(gw, 1):.1f} per walk)"
                                    f"   guest page faults {hw['guest_faults']:,}   guest A/D"
                                    f" set {hw['guest_ad_sets']:,}"))
    rows += mmu_rows(d["stats"], d["results"], c["root_level"])
    rows += [("emulator TLB", f"flushes {f['emulator_tlb_flushes']:,}"),
             ("audit", d["audit"])]
    return head + "\n" + "".join(f"  {k:<13}{v}\n" for k, v in rows)
