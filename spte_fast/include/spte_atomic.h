/* spte_fast: the atomics, locks and CPU hints of the engine.  vCPU threads run the fault
 * path with the GIL released, so every access to shared page-table memory and shared
 * counters goes through one of these; each is named for the C11 memory order it really
 * uses, so a reader (and ThreadSanitizer) sees exactly what is promised. */
#ifndef SPTE_FAST_SPTE_ATOMIC_H
#define SPTE_FAST_SPTE_ATOMIC_H

#include <stdint.h>
#include <pthread.h>

/* SPTEs.  The load is an acquire: a table linked by another vCPU (seq_cst CAS) was filled
 * before the link.  On x86 it is the same plain load as READ_ONCE. */
static inline uint64_t spte_load_acquire(const uint64_t *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
static inline void spte_store_relaxed(uint64_t *p, uint64_t v) { __atomic_store_n(p, v, __ATOMIC_RELAXED); }
static inline uint64_t spte_xchg_seq_cst(uint64_t *p, uint64_t v) { return __atomic_exchange_n(p, v, __ATOMIC_SEQ_CST); }
static inline int spte_try_cmpxchg_seq_cst(uint64_t *p, uint64_t *old, uint64_t new_) {
    return __atomic_compare_exchange_n(p, old, new_, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
}
static inline uint64_t spte_fetch_or_seq_cst(uint64_t *p, uint64_t m) { return __atomic_fetch_or(p, m, __ATOMIC_SEQ_CST); }
static inline uint64_t spte_fetch_and_seq_cst(uint64_t *p, uint64_t m) { return __atomic_fetch_and(p, m, __ATOMIC_SEQ_CST); }

/* Counters and flags shared between vCPU threads: no ordering needed, only atomicity. */
static inline void u8_or_relaxed(uint8_t *p, uint8_t m) { __atomic_fetch_or(p, m, __ATOMIC_RELAXED); }
static inline void u64_or_relaxed(uint64_t *p, uint64_t m) { __atomic_fetch_or(p, m, __ATOMIC_RELAXED); }
static inline void i64_add_relaxed(int64_t *p, int64_t v) { __atomic_fetch_add(p, v, __ATOMIC_RELAXED); }
static inline int64_t i64_load_relaxed(const int64_t *p) { return __atomic_load_n(p, __ATOMIC_RELAXED); }
static inline int i64_dec_if_positive_relaxed(int64_t *p) {   /* 1 if it was positive */
    int64_t v = __atomic_load_n(p, __ATOMIC_RELAXED);
    while (v > 0)
        if (__atomic_compare_exchange_n(p, &v, v - 1, 0, __ATOMIC_RELAXED, __ATOMIC_RELAXED))
            return 1;
    return 0;
}

/* Dirty bitmaps: vCPUs set bits (u64_or_relaxed, set_bit_le), the harvester takes whole
 * words (xchg) or clears the bits userspace names (fetch_andnot), as KVM's ioctls do. */
static inline uint64_t bitmap_xchg_word(uint64_t *p, uint64_t v) { return __atomic_exchange_n(p, v, __ATOMIC_SEQ_CST); }
static inline uint64_t bitmap_fetch_andnot_word(uint64_t *p, uint64_t m) { return __atomic_fetch_and(p, ~m, __ATOMIC_SEQ_CST); }
static inline void bitmap_store_word(uint64_t *p, uint64_t v) { __atomic_store_n(p, v, __ATOMIC_RELAXED); }

/* The grace period's epochs: seq_cst, because a reader's published epoch and a remover's
 * check of it must be ordered against each other (store -> load across threads). */
static inline uint64_t u64_load_seq_cst(const uint64_t *p) { return __atomic_load_n(p, __ATOMIC_SEQ_CST); }
static inline void u64_store_seq_cst(uint64_t *p, uint64_t v) { __atomic_store_n(p, v, __ATOMIC_SEQ_CST); }
static inline uint64_t u64_inc_return_seq_cst(uint64_t *p) { return __atomic_add_fetch(p, 1, __ATOMIC_SEQ_CST); }

static inline void spte_prefetch_read(const void *p) { __builtin_prefetch(p, 0, 3); }
static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

/* mmu_lock prefers writers, so zaps are not starved by a stream of fault chunks. */
static inline int spte_rwlock_init(pthread_rwlock_t *l) {
    pthread_rwlockattr_t a;
    pthread_rwlockattr_init(&a);
#if defined(__GLIBC__)
    pthread_rwlockattr_setkind_np(&a, PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP);
#endif
    int r = pthread_rwlock_init(l, &a);
    pthread_rwlockattr_destroy(&a);
    return r;
}

#endif
