/* Sort of n signed 64-bit integers in place: quicksort (median of three, an explicit stack,
 * the smaller part first) finished by insertion sort.  args: [0] n, [1] the array's
 * address. */
#include "start.h"

static void insertion(int64_t *a, int64_t lo, int64_t hi)
{
    for (int64_t i = lo + 1; i <= hi; i++) {
        int64_t v = a[i], j = i - 1;
        while (j >= lo && a[j] > v) {
            a[j + 1] = a[j];
            j--;
        }
        a[j + 1] = v;
    }
}

static inline void swap(int64_t *a, int64_t i, int64_t j)
{
    int64_t t = a[i];
    a[i] = a[j];
    a[j] = t;
}

void run(uint64_t *args)
{
    int64_t *a = (int64_t *)args[1];
    int64_t stack[128];
    int sp = 0;
    stack[sp++] = 0;
    stack[sp++] = (int64_t)args[0] - 1;
    while (sp) {
        int64_t hi = stack[--sp], lo = stack[--sp];
        while (hi - lo > 16) {
            int64_t mid = lo + (hi - lo) / 2;
            if (a[mid] < a[lo]) swap(a, mid, lo);
            if (a[hi] < a[lo]) swap(a, hi, lo);
            if (a[hi] < a[mid]) swap(a, hi, mid);
            int64_t pivot = a[mid], i = lo, j = hi;
            while (i <= j) {
                while (a[i] < pivot) i++;
                while (a[j] > pivot) j--;
                if (i <= j) {
                    swap(a, i, j);
                    i++;
                    j--;
                }
            }
            if (j - lo < hi - i) {          /* push the larger part, loop on the smaller */
                stack[sp++] = i;
                stack[sp++] = hi;
                hi = j;
            } else {
                stack[sp++] = lo;
                stack[sp++] = j;
                lo = i;
            }
        }
        insertion(a, lo, hi);
    }
}
