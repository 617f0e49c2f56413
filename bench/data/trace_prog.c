/* The program behind bench/data/lackey_trace.bin.xz (see README.md beside it).
 *
 * A few MB of heap touched in four patterns a guest would show: a sequential first-touch
 * write, a strided read (one cache line per page, crossing pages every step), a pointer
 * chase through a shuffled list of page-sized nodes, and call-heavy code (recursion that
 * grows the stack, qsort with a comparator).  Deterministic: a fixed-seed LCG, no I/O
 * but one line of output.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#define PAGE 4096
#define ARRAY_BYTES (6u << 20)          /* 6 MiB: 1536 pages */
#define NODES 1024                      /* 4 MiB of page-sized list nodes */

struct node { struct node *next; uint64_t payload[PAGE / 8 - 1]; };

static uint32_t lcg_state = 12345;
static uint32_t lcg(void) { lcg_state = lcg_state * 1103515245u + 12345u; return lcg_state >> 8; }

static uint64_t sequential_write(uint64_t *a, size_t n) {
    for (size_t i = 0; i < n; i += 8)           /* one store per cache line */
        a[i] = i;
    return a[n - 8];
}

static uint64_t strided_read(const uint64_t *a, size_t n, size_t stride, int rounds) {
    uint64_t sum = 0;
    for (int r = 0; r < rounds; r++)
        for (size_t i = (size_t)r * 8; i < n; i += stride)
            sum += a[i];
    return sum;
}

static uint64_t chase(struct node *nodes, int steps) {
    int *order = malloc(NODES * sizeof *order);
    for (int i = 0; i < NODES; i++) order[i] = i;
    for (int i = NODES - 1; i > 0; i--) {       /* Fisher-Yates */
        int j = lcg() % (i + 1), t = order[i];
        order[i] = order[j]; order[j] = t;
    }
    for (int i = 0; i < NODES; i++)
        nodes[order[i]].next = &nodes[order[(i + 1) % NODES]];
    free(order);
    uint64_t sum = 0;
    struct node *p = &nodes[0];
    for (int s = 0; s < steps; s++) {
        p->payload[s % 16] += s;
        sum += p->payload[(s * 7) % 511];
        p = p->next;
    }
    return sum;
}

static uint64_t recurse(int depth, uint64_t acc) {
    volatile char frame[512];                   /* 512 B of stack per call */
    frame[depth % 512] = (char)acc;
    if (depth == 0) return acc + frame[0];
    return recurse(depth - 1, acc * 31 + depth) + frame[depth % 512];
}

static int cmp_u32(const void *x, const void *y) {
    uint32_t a = *(const uint32_t *)x, b = *(const uint32_t *)y;
    return (a > b) - (a < b);
}

int main(void) {
    size_t n = ARRAY_BYTES / 8;
    uint64_t *a = malloc(ARRAY_BYTES);
    struct node *nodes = malloc(NODES * sizeof *nodes);
    uint32_t *keys = malloc(20000 * sizeof *keys);
    uint64_t sum = 0;

    sum += sequential_write(a, n);
    sum += strided_read(a, n, PAGE / 8 + 8, 16);     /* 4 KiB + 64 B stride */
    sum += chase(nodes, 200000);
    for (int i = 0; i < 40; i++)
        sum += recurse(256, (uint64_t)i);            /* 128 KiB of stack */
    for (int i = 0; i < 20000; i++) keys[i] = lcg();
    qsort(keys, 20000, sizeof *keys, cmp_u32);
    sum += keys[0] + keys[19999];

    printf("%llu\n", (unsigned long long)sum);
    free(keys); free(nodes); free(a);
    return 0;
}
