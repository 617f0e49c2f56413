/* Hash-table build and probe: n non-zero 64-bit keys inserted into an open-addressing table
 * of 2^k slots (linear probing, a multiplicative hash, key 0 marks an empty slot; a key
 * seen again keeps its first value), then m probes.  Each slot is {key, value} with value
 * the key's index in the input.  args: [0] n, [1] keys, [2] table (zeroed by the harness),
 * [3] k, [4] m, [5] probes; out: [6] probes found, [7] sum of the values found. */
#include "start.h"

static inline uint64_t slot_of(uint64_t key, int k)
{
    return (key * 0x9E3779B97F4A7C15ull) >> (64 - k);
}

void run(uint64_t *args)
{
    uint64_t n = args[0], *keys = (uint64_t *)args[1], *table = (uint64_t *)args[2];
    int k = (int)args[3];
    uint64_t m = args[4], *probes = (uint64_t *)args[5];
    uint64_t mask = (1ull << k) - 1, found = 0, sum = 0;
    for (uint64_t i = 0; i < n; i++) {
        uint64_t s = slot_of(keys[i], k);
        while (table[2 * s] != 0 && table[2 * s] != keys[i])
            s = (s + 1) & mask;
        if (table[2 * s] == 0) {
            table[2 * s] = keys[i];
            table[2 * s + 1] = i;
        }
    }
    for (uint64_t i = 0; i < m; i++) {
        uint64_t s = slot_of(probes[i], k);
        while (table[2 * s] != 0) {
            if (table[2 * s] == probes[i]) {
                found++;
                sum += table[2 * s + 1];
                break;
            }
            s = (s + 1) & mask;
        }
    }
    args[6] = found;
    args[7] = sum;
}
