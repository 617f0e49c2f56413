/* C = A B for N x N matrices of signed 64-bit integers (row-major, i-k-j order, the
 * products wrap modulo 2^64 as numpy's int64 does).  args: [0] N, [1] A, [2] B, [3] C. */
#include "start.h"

void run(uint64_t *args)
{
    uint64_t n = args[0];
    const int64_t *a = (const int64_t *)args[1], *b = (const int64_t *)args[2];
    int64_t *c = (int64_t *)args[3];
    for (uint64_t i = 0; i < n; i++) {
        for (uint64_t j = 0; j < n; j++)
            c[i * n + j] = 0;
        for (uint64_t k = 0; k < n; k++) {
            uint64_t aik = (uint64_t)a[i * n + k];
            for (uint64_t j = 0; j < n; j++)
                c[i * n + j] = (int64_t)((uint64_t)c[i * n + j] + aik * (uint64_t)b[k * n + j]);
        }
    }
}
