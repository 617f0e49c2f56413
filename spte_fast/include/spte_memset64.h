/* spte_fast: memset64 (the 6.10 memory cache's init_value fill) and the sync_page scan.
 *
 * Zero goes to libc memset (it picks the best store width at run time); any other pattern
 * uses a loop that GCC clones for AVX-512/AVX2 with run-time dispatch, so portable builds
 * still get wide stores.  The head is stored 8 bytes at a time up to a 64-byte boundary:
 * numpy and malloc hand out 16-byte-aligned blocks, and there every other 32-byte store
 * splits a cache line, which costs ~40% of store bandwidth. */
#ifndef SPTE_FAST_SPTE_MEMSET64_H
#define SPTE_FAST_SPTE_MEMSET64_H

#include <stdint.h>
#include <stddef.h>
#include <string.h>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__)
#define SPTE_WIDE_CLONES __attribute__((unused, target_clones("avx512f", "avx2", "default")))
#else
#define SPTE_WIDE_CLONES __attribute__((unused))
#endif

SPTE_WIDE_CLONES
static void spte_memset64_pattern(uint64_t *p, uint64_t v, size_t n) {
    while (n && ((uintptr_t)p & 63)) { *p++ = v; n--; }
    uint64_t *a = (uint64_t *)__builtin_assume_aligned(p, 64);
    for (size_t i = 0; i < n; i++) a[i] = v;
}

/* The sync_page scan's count: entries that differ from the never-used value. */
SPTE_WIDE_CLONES
static int64_t spte_count_ne(const uint64_t *p, uint64_t v, size_t n) {
    int64_t c = 0;
    for (size_t i = 0; i < n; i++) c += p[i] != v;
    return c;
}

static inline void spte_memset64(uint64_t *p, uint64_t v, size_t n) {
    if (v == 0) memset(p, 0, n * sizeof(uint64_t));
    else spte_memset64_pattern(p, v, n);
}

#endif
