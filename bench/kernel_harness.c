/*
 * The compiled pass's loops without Python, to run them where the extension cannot be built or imported: the
 * tests cross-compile this file for AArch64 and run it under qemu-aarch64 (tests/test_kernel.py,
 * scripts/check_aarch64.sh), feeding it the same runs the x86 extension gets.
 *
 *   kernel_harness ISA GOLDEN_KIND MY_KIND full|light < runs
 *
 * ISA: a copy of the loops (_kernel.isa()'s names); kinds: _kernel.KINDS' numbers. stdin holds the runs, each as
 * int64 element count, int32 count_golden, int32 count_my (little-endian), then the golden and the my payload.
 * Every payload is placed at an odd address, so unaligned loads are exercised too. stdout: one "name value" line
 * per state slot, values as %.17g (exact for float64). Exit 2 on bad arguments or input.
 */
#define KERNEL_NO_PYTHON
#include "../pytest_ait_llm/compare/_kernel.c"

#include <stdio.h>
#include <stdlib.h>

static int read_exact(void *dst, size_t size) { return fread(dst, 1, size, stdin) == size; }

int main(int argc, char **argv) {
    if (argc != 5 || !pick_isa(argv[1])) {
        fprintf(stderr, "usage: kernel_harness ISA GOLDEN_KIND MY_KIND full|light < runs (ISA available here)\n");
        return 2;
    }
    int gk = atoi(argv[2]), mk = atoi(argv[3]), light = !strcmp(argv[4], "light");
    if (gk < 0 || gk > 3 || mk < 0 || mk > 3) {
        fprintf(stderr, "unknown element kind\n");
        return 2;
    }
    double st[S_SIZE];
    memcpy(st, SLOT_STARTS, sizeof st);
    int64_t n;
    int32_t count[2];
    while (read_exact(&n, sizeof n)) {
        if (!read_exact(count, sizeof count) || n < 0) {
            fprintf(stderr, "truncated run header\n");
            return 2;
        }
        size_t gsize = (size_t)n * (size_t)item_size(gk), msize = (size_t)n * (size_t)item_size(mk);
        char *buf = malloc(gsize + msize + 2);
        if (!buf || !read_exact(buf + 1, gsize) || !read_exact(buf + 1 + gsize + (gsize % 2 == 0), msize)) {
            fprintf(stderr, "truncated run payload\n");
            return 2;
        }
        const char *g = buf + 1, *m = buf + 1 + gsize + (gsize % 2 == 0); /* both at odd addresses */
        if (light)
            light_pass(g, gk, m, mk, (Py_ssize_t)n, st);
        else
            full_pass(g, gk, m, mk, (Py_ssize_t)n, count[0], count[1], st);
        free(buf);
    }
    for (int i = 0; i < S_SIZE; i++) printf("%s %.17g\n", SLOT_NAMES[i], st[i]);
    return 0;
}
