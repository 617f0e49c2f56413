/* A TLB-miss loop for measuring fills: `rounds` passes over n pages, each a load of the
 * page's first word followed by invlpg of the page, so that every load misses the TLB and
 * fills.  args: [0] n, [1] the first page's address, [2] rounds; out: [3] the sum of the
 * words loaded. */
#include "start.h"

void run(uint64_t *args)
{
    uint64_t n = args[0], base = args[1], rounds = args[2], sum = 0;
    for (uint64_t r = 0; r < rounds; r++) {
        for (uint64_t p = 0; p < n; p++) {
            const volatile uint64_t *w = (const volatile uint64_t *)(base + (p << 12));
            sum += *w;
            __asm__ volatile("invlpg (%0)" : : "r"(w) : "memory");
        }
    }
    args[3] = sum;
}
