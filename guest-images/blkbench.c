/* In-guest block benchmark for thinvm's guest (static, no dependencies): O_DIRECT I/O on
   a block device, timed with CLOCK_MONOTONIC.
     blkbench DEVICE randread|randwrite|seqread|seqwrite BLOCK_SIZE SECONDS [RANGE_MIB]
   prints: THINVM-BENCH mode=... bs=... ops=... secs=... iops=... mib_s=... */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

int main(int argc, char **argv) {
    if (argc < 5) {
        fprintf(stderr, "usage: blkbench DEV MODE BS SECONDS [RANGE_MIB]\n");
        return 2;
    }
    const char *dev = argv[1], *mode = argv[2];
    long bs = atol(argv[3]);
    double secs = atof(argv[4]);
    long long range = (argc > 5 ? atoll(argv[5]) : 256) << 20;
    int writing = strstr(mode, "write") != NULL;
    int random = strncmp(mode, "rand", 4) == 0;
    int fd = open(dev, (writing ? O_RDWR : O_RDONLY) | O_DIRECT);
    if (fd < 0) { perror(dev); return 1; }
    void *buf;
    if (posix_memalign(&buf, 4096, bs)) return 1;
    memset(buf, 0x5a, bs);
    unsigned long long x = 88172645463325252ULL, ops = 0;
    long long off = 0, slots = range / bs;
    double t0 = now(), t;
    do {
        for (int i = 0; i < 16; i++) {
            if (random) {
                x ^= x << 13; x ^= x >> 7; x ^= x << 17;
                off = (long long)(x % slots) * bs;
            } else {
                off = (off + bs) % (slots * bs);
            }
            /* Non-zero data, varied so zero detection has nothing to skip. */
            ((unsigned long long *)buf)[0] = x + ops;
            ssize_t n = writing ? pwrite(fd, buf, bs, off) : pread(fd, buf, bs, off);
            if (n != bs) { perror("io"); return 1; }
            ops++;
        }
        t = now() - t0;
    } while (t < secs);
    if (writing) fdatasync(fd);
    t = now() - t0;
    printf("THINVM-BENCH mode=%s bs=%ld ops=%llu secs=%.2f iops=%.0f mib_s=%.1f\n", mode, bs, ops, t,
           ops / t, ops * (double)bs / t / 1048576.0);
    return 0;
}
