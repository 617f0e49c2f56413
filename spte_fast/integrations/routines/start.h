/* The entry of every bundled routine (spte_fast.integrations.routines): the harness sets
 * rdi to the argument block and rsp to the top of the stack, starts at the first byte of
 * the flat binary and stops at the hlt.  Freestanding: no libc, no system calls. */
#include <stdint.h>

void run(uint64_t *args);

__asm__(".section .text.start,\"ax\",@progbits\n"
        ".globl _start\n"
        "_start:\n"
        "    call run\n"
        "    hlt\n"
        ".previous\n");
