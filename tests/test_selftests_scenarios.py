"""The KVM selftests as scenarios (issue 11 item 5): ``spte-fast demand-paging``,
``access-tracking-perf`` and ``dirty-log-perf``.

Three things are checked: the lines are the selftests' own (Linux 6.10's format strings,
quoted beside each regular expression), the model's counts are what 6.10 does in each phase
(derived in the comments, with the source), and the command line keeps the contract (JSON
document, bad options -> status 2 with the usage).  Sizes are small (``-b 8M`` = 2048 pages
per vCPU); timings are never compared.

The dirty-log-perf tests need the dirty-log API of issue 11 items 1-3 (``Vm.get_dirty_log``
and friends), which is being written beside this command: they skip until it exists.
"""
import re

import numpy as np
import pytest

import spte_fast as sf
from spte_fast.sim import selftests as st
from support.cli import run_cli

PAGES = 2048                                  # -b 8M
HAS_DIRTY_LOG = hasattr(sf.Vm, "get_dirty_log")
needs_dirty_log = pytest.mark.skipif(
    not HAS_DIRTY_LOG, reason="needs the dirty-log API (Vm.set_memslot_flags, get_dirty_log, "
                              "clear_dirty_log; issue 11 items 1-3), not on this branch yet")

TS = r"\d+\.\d{9}s"                          # "%ld.%.9lds"
PREAMBLE = [
    r"Testing guest mode: PA-bits:ANY, VA-bits:48,  4K pages",
    r"Random seed: 0x[0-9a-f]+",
    r"guest physical test memory: \[0x[0-9a-f]+, 0x[0-9a-f]+\)",
]
MODEL = r"    \[model\] .*"


def phases(doc):
    return {p["name"]: p for p in doc["phases"]}


def check_lines(lines, patterns):
    """Every line matches its pattern in order, the [model] lines aside."""
    selftest = [ln for ln in lines if not ln.startswith("    [model] ")]
    assert len(selftest) == len(patterns), "\n".join(lines)
    for line, pat in zip(selftest, patterns):
        assert re.fullmatch(pat, line), (line, pat)
    for line in lines:
        if line.startswith("    [model] "):
            assert re.fullmatch(MODEL, line)


# ---------------------------------------------------------------------------------------
# Options parsed as the selftests parse them
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, size", [
    ("1G", 1 << 30), ("512M", 512 << 20), ("8m", 8 << 20), ("64K", 64 << 10),
    ("4096", 4096), ("4096b", 4096), ("1GB", 1 << 30), ("1Gxyz", 1 << 30),
    ("0x1000", 4096), ("010k", 8 << 10), ("1t", 1 << 40)])
def test_parse_size_is_test_util_parse_size(text, size):
    # strtoull(s, &end, 0), then only the first letter after the number scales it.
    assert st.parse_size(text) == size


@pytest.mark.parametrize("text", ["", "G", " 1G", "-1G", "1x", "0", "5000", "1.5G"])
def test_parse_size_refuses(text):
    with pytest.raises(Exception):
        st.parse_size(text)


def test_guest_random_is_park_miller_kept_across_passes():
    # test_util.c: state = (uint64_t)state * 48271 % ((uint32_t)(1 << 31) - 1).
    rng = st.GuestRandom(0x6B8B4567)
    got = list(rng.take(2500)) + list(rng.take(7))
    x, want = 0x6B8B4567, []
    for _ in range(2507):
        x = x * 48271 % (2**31 - 1)
        want.append(x)
    assert got == want


def test_memstress_places_the_region_at_the_top_of_guest_memory():
    # memstress_create_vm: gpa = (max_gfn + 1 - guest_num_pages - 1) * 4096 aligned down to
    # the backing page; the published 1 GiB run printed [0x3fffbffff000, 0x3ffffffff000).
    with st.Memstress(1, 1 << 30, "anonymous") as ms:
        assert ms.preamble[2] == "guest physical test memory: [0x3fffbffff000, 0x3ffffffff000)"
    with st.Memstress(2, 8 << 20, "anonymous_hugetlb_1gb") as ms:
        assert ms.base_gfn % (1 << 18) == 0 and ms.pages == 2 * PAGES


# ---------------------------------------------------------------------------------------
# demand-paging
# ---------------------------------------------------------------------------------------

DEMAND_LINES = PREAMBLE + [
    r"Finished creating vCPUs and starting uffd threads",
    r"Started all vCPUs",
    r"All vCPU threads joined",
    rf"Total guest execution time:\t{TS}",                   # "...:\t%ld.%.9lds\n"
    r"Per-vcpu demand paging rate:\t\d+\.\d{6} pgs/sec/vcpu",  # "...:\t%f pgs/sec/vcpu\n"
    r"Overall demand paging rate:\t\d+\.\d{6} pgs/sec",       # "...:\t%f pgs/sec\n"
]


def test_demand_paging_prints_the_selftest_lines():
    r = run_cli("demand-paging", "-b", "8M")
    assert r.rc == 0 and r.err == "", r.err
    lines = r.out.splitlines()
    check_lines(lines, DEMAND_LINES)
    assert lines[1] == "Random seed: 0x6b8b4567"      # kvm_selftest_init: random()
    per_vcpu = float(lines[-2].split("\t")[1].split()[0])
    overall = float(lines[-1].split("\t")[1].split()[0])
    assert overall == pytest.approx(per_vcpu)          # one vCPU


@pytest.mark.parametrize("vcpus, partition", [(1, True), (2, True), (2, False)])
def test_demand_paging_faults_each_touched_page_once(vcpus, partition):
    # One pass of memstress_guest_code, 100 % writes: every page's first write is an EPT
    # violation on a non-present SPTE, fixed by the slow path with a writable, dirty leaf
    # (make_spte with ACC_ALL on a write).  Partitioned: exactly one fault per page.
    # With -o both vCPUs write every page; the second one hits, or -- when it exited
    # before the first one's SPTE was in -- its own slow path finds that SPTE: 6.10's
    # make_spte returns before setting D when the old SPTE is writable ("if
    # (is_writable_pte(old_spte)) goto out"), so the new SPTE differs (no D) and replaces
    # it: a second FIXED for that page, the old D going to the host page.  The leaves
    # still number the pages touched.
    doc = st.run_demand_paging(vcpus, 8 << 20, partition=partition)
    total = phases(doc)["Total guest execution time"]
    d, res = total["stats"], total["results"]
    touched = vcpus * PAGES
    assert doc["pages_touched"] == touched
    assert d["faults_fixed"] == res["fixed"]
    if partition:
        assert res["fixed"] == touched
    else:
        assert touched <= res["fixed"] <= total["accesses"]
    assert d["pages_4k"] == touched
    assert d["exits_ept_violation"] == res["fixed"] + res["spurious"] + res["retry"]
    assert total["accesses"] == (vcpus * touched if not partition else touched)
    # Every access hits, or exits at least once (each exit one result).
    assert res["hits"] + res["fixed"] + res["spurious"] + res["retry"] >= total["accesses"]
    assert d["tlb_flushes"] == d["tlb_flushes_ranged"] == 0
    per_vcpu_pages = touched if not partition else PAGES      # vcpu_args[0].pages
    assert doc["per_vcpu_pages_per_s"] == pytest.approx(
        per_vcpu_pages / total["seconds"])
    assert doc["overall_pages_per_s"] == pytest.approx(doc["per_vcpu_pages_per_s"] * vcpus)
    assert doc["audit"] == "passed"


@pytest.mark.parametrize("backing, level_key, per_leaf", [
    ("anonymous_thp", "pages_2m", 512), ("anonymous_hugetlb", "pages_2m", 512),
    ("shmem", "pages_4k", 1)])
def test_demand_paging_backing_sets_the_mapping_level(backing, level_key, per_leaf):
    # -s bounds the host mapping level (host_pfn_mapping_level): one fault per huge page.
    doc = st.run_demand_paging(1, 8 << 20, backing=backing)
    d = phases(doc)["Total guest execution time"]["stats"]
    assert d["faults_fixed"] == PAGES // per_leaf == d[level_key]


def test_demand_paging_1g_hugetlb_maps_1g_leaves():
    # 2 vCPUs x 512 MiB in one 1 GiB-aligned GiB: a single 1G leaf, one fault; the other
    # vCPU's first access hits it, or finds it fixed (SPURIOUS) or frozen (RETRY).
    doc = st.run_demand_paging(2, 512 << 20, backing="anonymous_hugetlb_1gb")
    d = phases(doc)["Total guest execution time"]["stats"]
    assert d["faults_fixed"] == 1 and d["pages_1g"] == 1 and d["pages_4k"] == 0


# ---------------------------------------------------------------------------------------
# access-tracking-perf
# ---------------------------------------------------------------------------------------

ACCESS_PHASES = ["Populating memory", "Writing to populated memory",
                 "Reading from populated memory", "Mark memory idle",
                 "Writing to idle memory", "Mark memory idle", "Reading from idle memory"]
ACCESS_LINES = PREAMBLE + [""] + [rf"{re.escape(f'{n:<30}')}: {TS}"     # "%-30s: %ld.%09lds"
                                  for n in ACCESS_PHASES]


def test_access_tracking_prints_the_selftest_lines():
    r = run_cli("access-tracking-perf", "-b", "8M")
    assert r.rc == 0 and r.err == "", r.err
    check_lines(r.out.splitlines(), ACCESS_LINES)


def _access_phases(doc):
    ph = doc["phases"]
    assert [p["name"] for p in ph] == ACCESS_PHASES
    return ph


@pytest.mark.parametrize("layout", ["ept", "npt"])
def test_access_tracking_with_ad_bits(layout):
    doc = st.run_access_tracking(1, 8 << 20, layout=layout)
    pop, wpop, rpop, idle1, widle, idle2, ridle = _access_phases(doc)
    # Populating: every page faults once (EPT violation / #NPF), FIXED, A and D set by
    # make_spte (a write fault on a non-prefetched SPTE): no A/D assist needed.
    assert pop["stats"]["faults_fixed"] == PAGES and pop["results"]["hits"] == 0
    # Populated memory: the leaves permit reads and writes with A and D set: no exit,
    # nothing for the CPU to set.
    for p in (wpop, rpop):
        assert p["results"]["hits"] == PAGES
        assert p["stats"]["exits_ept_violation"] == p["stats"]["hw_ad_sets"] == 0
    # Mark idle = page_idle -> clear_young notifier -> kvm_age_gfn (6.10 tdp_mmu.c
    # age_gfn_range): with A/D, tdp_mmu_clear_spte_bits(A) on every accessed leaf -- exactly
    # the populated pages --, no handle_changed_spte, no TLB flush (clear_young; spec §3.11).
    for p in (idle1, idle2):
        assert p["leaves"] == p["young_before"] == p["aged"] == PAGES
        assert p["young_after"] == 0 and p["young_returned"] == 1
        d = p["stats"]
        assert d["tlb_flushes"] == d["tlb_flushes_ranged"] == d["spte_changes"] == 0
    # Idle memory: the leaves are present, writable, D set, A clear: the CPU's walk permits
    # the access and sets A (one atomic OR: an A/D assist), no exit, no fault (SDM 29.3.5;
    # AMD APM 15.25.x for NPT).
    for p in (widle, ridle):
        assert p["results"]["hits"] == PAGES
        assert p["stats"]["hw_ad_sets"] == PAGES
        assert p["stats"]["exits_ept_violation"] == p["stats"]["faults_fast"] == 0
    assert doc["audit"] == "passed"


def test_access_tracking_without_ad_bits_takes_fast_page_faults():
    # eptad=N: age_gfn_range marks every accessed leaf for access tracking (RWX saved and
    # cleared; W dropped after pushing it to the page's dirty flag).  The access then finds
    # a not-present EPT entry: an EPT violation that fast_page_fault fixes without mmu_lock
    # (page_fault_can_be_fast allows a not-present fault when A/D is off; it restores the
    # saved bits and, for a write, W from MMU-writable), FIXED, counted in pf_fast.
    doc = st.run_access_tracking(1, 8 << 20, layout="ept-noad")
    pop, wpop, rpop, idle1, widle, idle2, ridle = _access_phases(doc)
    for p in (idle1, idle2):
        assert p["leaves"] == p["aged"] == PAGES and p["young_after"] == 0
        assert p["stats"]["tlb_flushes"] == 0
    for p in (widle, ridle):
        d = p["stats"]
        assert d["exits_ept_violation"] == d["faults_fast"] == d["faults_fixed"] == PAGES
        assert d["hw_ad_sets"] == 0 and d["spte_changes"] == 0   # 6.10: no bookkeeping
        assert p["results"]["fast"] == PAGES
    assert doc["audit"] == "passed"


def test_access_tracking_overlap_marks_once_from_vcpu0():
    # -o: mark_vcpu_memory_idle returns early on every vCPU but 0, which marks all pages.
    doc = st.run_access_tracking(2, 8 << 20, partition=False)
    for p in doc["phases"]:
        if p["name"] == "Mark memory idle":
            assert p["aged"] == 2 * PAGES and p["young_returned"] == 1
        elif p["name"] == "Writing to idle memory":
            # Each page is accessed by both vCPUs: A is set once per page, or twice when
            # both walks found it clear before either OR landed (the CPU's assist is an
            # atomic OR of a missing bit, as on hardware).
            assert 2 * PAGES <= p["stats"]["hw_ad_sets"] <= 4 * PAGES
            assert p["results"]["hits"] == 4 * PAGES


# ---------------------------------------------------------------------------------------
# dirty-log-perf
# ---------------------------------------------------------------------------------------

def dirty_lines(iterations, manual=True):
    it = []
    for i in range(1, iterations + 1):
        it += [rf"Iteration {i} dirty memory time: {TS}",
               rf"Iteration {i} get dirty log time: {TS}"]
        if manual:
            it.append(rf"Iteration {i} clear dirty log time: {TS}")
    tail = [rf"Disabling dirty logging time: {TS}",
            rf"Get dirty log over {iterations} iterations took {TS}\. "
            rf"\(Avg {TS}/iteration\)"]
    if manual:
        tail.append(rf"Clear dirty log over {iterations} iterations took {TS}\. "
                    rf"\(Avg {TS}/iteration\)")
    return ([rf"Test iterations: {iterations}"] + PREAMBLE +
            [rf"Populate memory time: {TS}", rf"Enabling dirty logging time: {TS}", ""] +
            it + tail)


@pytest.mark.skipif(HAS_DIRTY_LOG, reason="the dirty-log API exists")
def test_dirty_log_perf_without_the_api_says_so():
    r = run_cli("dirty-log-perf", "-b", "8M")
    assert r.rc == 1 and r.out == ""
    assert "needs the dirty-log API" in r.err


@needs_dirty_log
@pytest.mark.parametrize("args, iterations, manual", [
    ((), 2, True), (("-g", "-i", "3"), 3, False)])
def test_dirty_log_perf_prints_the_selftest_lines(args, iterations, manual):
    r = run_cli("dirty-log-perf", "-b", "8M", *args)
    assert r.rc == 0 and r.err == "", r.err
    lines = r.out.splitlines()
    check_lines(lines, dirty_lines(iterations, manual))
    assert lines[2] == "Random seed: 0x1"             # dirty_log_perf_test: seed 1


def _iteration(doc, i, what):
    return phases(doc)[f"Iteration {i} {what}"]


@needs_dirty_log
@pytest.mark.parametrize("write_percent", [100, 50])
def test_dirty_log_without_manual_protect_logs_exactly_the_written_pages(write_percent):
    # -g, PML off: enabling write-protects every 4K leaf, clearing W only (MMU-writable
    # kept, kvm_tdp_mmu_wrprot_slot); each first write of an iteration is an EPT violation
    # on a present SPTE that fast_page_fault fixes by setting W and marking the page dirty.
    # KVM_GET_DIRTY_LOG without manual protect returns and clears the bitmap and
    # write-protects those pages again, so each iteration logs exactly its written pages.
    doc = st.run_dirty_log(1, 8 << 20, write_percent=write_percent, manual_protect=False,
                           pml=False)
    for i in (1, 2):
        dirty, get = _iteration(doc, i, "dirty memory"), _iteration(doc, i, "get dirty log")
        written = dirty["pages_written"]
        assert 0 < written <= PAGES
        if write_percent == 100:
            assert written == PAGES
        assert dirty["stats"]["faults_fast"] == written
        assert dirty["stats"]["exits_ept_violation"] == written
        assert get["dirty_pages"] == get["expected_dirty_pages"] == written
        assert get["log_as_expected"]
    assert doc["audit"] == "passed"


@needs_dirty_log
def test_dirty_log_manual_initially_set():
    # Default (manual protect + KVM_DIRTY_LOG_INITIALLY_SET), PML off: enabling changes no
    # SPTE (kvm_mmu_slot_apply_flags returns early), so iteration 1 writes without a fault
    # and its log is the initially-set bitmap, every page; its KVM_CLEAR_DIRTY_LOG
    # write-protects them (clear_dirty_pt_masked, wrprot), so iteration 2's writes take
    # the fast page fault and its log is exactly the pages written.
    doc = st.run_dirty_log(1, 8 << 20, write_percent=50, pml=False)
    enable = phases(doc)["Enabling dirty logging"]
    assert enable["stats"]["spte_changes"] == 0 and enable["stats"]["tlb_flushes"] == 0
    d1, g1 = _iteration(doc, 1, "dirty memory"), _iteration(doc, 1, "get dirty log")
    assert d1["stats"]["exits_ept_violation"] == 0
    assert g1["dirty_pages"] == PAGES and g1["log_as_expected"]
    d2, g2 = _iteration(doc, 2, "dirty memory"), _iteration(doc, 2, "get dirty log")
    assert d2["stats"]["faults_fast"] == d2["pages_written"] == g2["dirty_pages"]
    assert g2["log_as_expected"]


@needs_dirty_log
def test_dirty_log_with_pml_clears_d_instead():
    # -g with PML (EPT A/D): enabling clears D on the 4K leaves (kvm_mmu_slot_leaf_clear_dirty)
    # and write-protects only >= 2M; a write then sets D in the CPU's walk (an A/D assist,
    # logged in the PML buffer), no exit; the log is exactly the written pages.
    doc = st.run_dirty_log(1, 8 << 20, write_percent=50, manual_protect=False, pml=True)
    d1, g1 = _iteration(doc, 1, "dirty memory"), _iteration(doc, 1, "get dirty log")
    assert d1["stats"]["exits_ept_violation"] == 0
    assert d1["stats"]["hw_ad_sets"] == d1["pages_written"] == g1["dirty_pages"]
    assert g1["log_as_expected"]


@needs_dirty_log
def test_dirty_log_eager_split_of_1g_pages():
    # 1 GiB hugetlb, -g: with eager_page_split the enabling splits the 1G leaf down to 4K
    # (+512 at each level below, no flush for the split) before write-protecting; without
    # it the leaf stays huge until the writes split it on fault.
    on = st.run_dirty_log(1, 1 << 30, backing="anonymous_hugetlb_1gb",
                          manual_protect=False, pml=False, eager_split=True)
    en = phases(on)["Enabling dirty logging"]["stats"]
    assert en["pages_1g"] == -1 and en["pages_4k"] == 1 << 18
    off = st.run_dirty_log(1, 1 << 30, backing="anonymous_hugetlb_1gb",
                           manual_protect=False, pml=False, eager_split=False)
    en = phases(off)["Enabling dirty logging"]["stats"]
    assert en["pages_1g"] == 0 and en["pages_4k"] == 0
    assert _iteration(off, 1, "get dirty log")["log_as_expected"]


@needs_dirty_log
def test_dirty_log_run_vcpus_while_disabling():
    doc = st.run_dirty_log(2, 8 << 20, run_while_disabling=True)
    assert phases(doc)["Disabling dirty logging"]["accesses"] > 0
    assert doc["audit"] == "passed"


# ---------------------------------------------------------------------------------------
# The command line: JSON, errors
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("command", [
    "demand-paging", "access-tracking-perf",
    pytest.param("dirty-log-perf", marks=needs_dirty_log)])
def test_json_document(command):
    r = run_cli(command, "-b", "8M", "-v", "2", "--json")
    assert r.rc == 0 and r.err == "", r.err
    doc = r.json()
    assert set(doc) >= {"test", "command", "config", "lines", "phases", "stats", "audit"}
    assert doc["command"] == command and doc["audit"] == "passed"
    cfg = doc["config"]
    assert (cfg["vcpus"], cfg["vcpu_bytes"], cfg["pages"]) == (2, 8 << 20, 2 * PAGES)
    assert cfg["memslots"][0]["npages"] == 2 * PAGES
    for p in doc["phases"]:
        assert set(p) >= {"name", "ns", "seconds", "line", "results", "stats"}
        assert p["line"] in doc["lines"]
        assert isinstance(p["ns"], int) and p["ns"] >= 0
        assert all(isinstance(v, int) for v in p["stats"].values())
    # The text run prints the same lines (timings aside).
    text = run_cli(command, "-b", "8M", "-v", "2").out.splitlines()
    strip = re.compile(r"\d+\.\d+")
    assert [strip.sub("#", ln) for ln in text] == [strip.sub("#", ln) for ln in doc["lines"]]


@pytest.mark.parametrize("args", [
    ("demand-paging", "-v", "0"), ("demand-paging", "-v", "257"),
    ("demand-paging", "-v", "two"), ("demand-paging", "-b", "5000"),
    ("demand-paging", "-b", "1X"), ("demand-paging", "-s", "tmpfs"),
    ("demand-paging", "-u", "MISSING"), ("demand-paging", "-c", "1,2"),
    ("access-tracking-perf", "-m", "3"), ("dirty-log-perf", "-n"),
    ("demand-paging", "--frobnicate"), ("access-tracking-perf", "-b"),
    ("access-tracking-perf", "--layout", "x86"),
    ("dirty-log-perf", "-i", "1"), ("dirty-log-perf", "-w", "101"),
    ("dirty-log-perf", "-w", "50", "-f", "2"), ("dirty-log-perf", "-x", "0"),
    ("dirty-log-perf", "--eager-split", "maybe")])
def test_bad_options_exit_2_with_usage(args):
    r = run_cli(*args)
    assert r.rc == 2 and r.out == "", (r.rc, r.out)
    lines = r.err.splitlines()
    assert lines[0].startswith(f"usage: spte-fast {args[0]} "), r.err
    assert lines[-1].startswith("spte-fast: error: "), r.err
    assert "Traceback" not in r.err


def test_slots_must_divide_the_region():
    # memstress: "Guest memory cannot be evenly divided into %d slots."
    # dirty_log_perf_test prints "Test iterations" before memstress creates the VM and asserts.
    r = run_cli("dirty-log-perf", "-b", "8M", "-x", "3")
    assert r.rc == (2 if HAS_DIRTY_LOG else 1)
    assert r.out in ("", "Test iterations: 2\n")
    assert r.err.startswith("spte-fast: error: ")
    assert "cannot be evenly divided into 3 slots" in r.err


def test_help_lists_the_three_commands():
    out = run_cli("--help").out
    for command in ("demand-paging", "access-tracking-perf", "dirty-log-perf"):
        assert command in out
    dl = run_cli("dirty-log-perf", "--help").out
    for opt in ("-i", "-w", "-f", "-g", "-e", "-a", "-r", "-x", "--eager-split", "--pml"):
        assert re.search(rf"(^|\s){re.escape(opt)}\b", dl), opt
