/* Linked-list walk: nodes {next, value} of 16 bytes anywhere in memory, next 0 at the end.
 * args: [0] the head's address; out: [1] nodes visited, [2] sum of their values. */
#include "start.h"

struct node {
    struct node *next;
    uint64_t value;
};

void run(uint64_t *args)
{
    uint64_t count = 0, sum = 0;
    for (struct node *p = (struct node *)args[0]; p; p = p->next) {
        count++;
        sum += p->value;
    }
    args[1] = count;
    args[2] = sum;
}
