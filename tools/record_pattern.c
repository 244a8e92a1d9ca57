/* The request patterns a large checkpoint record can go out in, timed in C next to a raw write of
 * the same pages (README "Checkpoint speed": "Two requests for a 1 MiB state").
 *
 * A checkpoint of a large state writes its data from where it lies (O_DIRECT, the state's own
 * pages), a header block that needs the data's CRC32C, and the data's last partial block from a
 * small aligned buffer. This harness times, in 20 ms turns taken in a random order, on one
 * allocation per round (malloc, as a Python bytes object's memory; new each round, since a large
 * write's speed depends on its pages' physical pieces):
 *
 *   raw          pwritev2 RWF_DSYNC of the pages' whole blocks + the tail block (the baseline)
 *   two          what gf_slot_write_direct does now for two chunks or more: chunk 2 and the tail
 *                block by AIO at once, the CRC, then the head with chunk 1 (one vectored request),
 *                reap, fdatasync: two requests
 *   four         what it did before: both chunks by AIO, the CRC, then the tail and the head in
 *                requests of their own, reap, fdatasync: four requests
 *   four_nocrc   the same without the CRC (what the request count alone costs)
 *   one_aio      head, data and tail as one vectored AIO request (no CRC), reap, fdatasync
 *   crc_then_raw the CRC, then head, data and tail in one pwritev2 RWF_DSYNC (nothing overlapped)
 *
 * and prints each one's mean time per op, its ratio to raw (raw's time / its time) and its
 * thread CPU time per op. Build and run (the file's first 32 MiB are overwritten):
 *
 *   gcc -O2 -o /tmp/record_pattern tools/record_pattern.c native/gf_crc.c -I native -lpthread
 *   /tmp/record_pattern FILE [SECONDS [BYTES]]
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/aio_abi.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include "gf_crc.h"

#define BS 4096
#define NCASES 6
static const char *names[NCASES] = {"raw", "two", "four", "four_nocrc", "one_aio", "crc_then_raw"};
static aio_context_t ctx;
static int fd;

static double clock_us(clockid_t id) {
    struct timespec t;
    clock_gettime(id, &t);
    return t.tv_sec * 1e6 + t.tv_nsec / 1e3;
}

static void prep(struct iocb *cb, void *buf, size_t len, off_t off) {
    memset(cb, 0, sizeof *cb);
    cb->aio_lio_opcode = IOCB_CMD_PWRITE;
    cb->aio_fildes = (uint32_t)fd;
    cb->aio_buf = (uint64_t)(uintptr_t)buf;
    cb->aio_nbytes = len;
    cb->aio_offset = off;
}

static void prepv(struct iocb *cb, struct iovec *iov, int n, off_t off) {
    memset(cb, 0, sizeof *cb);
    cb->aio_lio_opcode = IOCB_CMD_PWRITEV;
    cb->aio_fildes = (uint32_t)fd;
    cb->aio_buf = (uint64_t)(uintptr_t)iov;
    cb->aio_nbytes = (uint64_t)n;
    cb->aio_offset = off;
}

static int submit(struct iocb **cbs, long n) { return syscall(SYS_io_submit, ctx, n, cbs) == n ? 0 : -1; }

static int submit1(struct iocb *cb) { return submit(&cb, 1); }

/* The data's CRC32C into the head block (where a record header keeps it). */
static void stamp(uint8_t *head, const uint8_t *data, size_t n) {
    uint32_t crc = gf_crc32c(data, n, 0);
    memcpy(head + 60, &crc, 4);
}

static int reap(long n) {
    struct io_event ev[8];
    while (n > 0) {
        long got = syscall(SYS_io_getevents, ctx, 1L, n, ev, NULL);
        if (got < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        for (long i = 0; i < got; i++)
            if (ev[i].res < 0) return -1;
        n -= got;
    }
    return 0;
}

static void die(const char *what) {
    perror(what);
    exit(1);
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: %s FILE [SECONDS [BYTES]]\n", argv[0]);
        return 2;
    }
    double secs = argc > 2 ? atof(argv[2]) : 20;
    size_t n = argc > 3 ? (size_t)atoll(argv[3]) : (1u << 20);
    if (n < 4 * BS || n > (8u << 20)) {
        fprintf(stderr, "BYTES must be within 16 KiB-8 MiB\n");
        return 2;
    }
    fd = open(argv[1], O_RDWR | O_CREAT | O_DIRECT, 0600);
    if (fd < 0) die("open (O_DIRECT)");
    void *zero;
    if (posix_memalign(&zero, BS, 32u << 20)) die("posix_memalign");
    memset(zero, 0, 32u << 20);
    if (pwrite(fd, zero, 32u << 20, 0) != (ssize_t)(32u << 20) || fsync(fd)) die("preparing the file");
    free(zero);
    if (syscall(SYS_io_setup, 64, &ctx) < 0) die("io_setup");
    uint8_t *head, *tail;
    if (posix_memalign((void **)&head, BS, BS) || posix_memalign((void **)&tail, BS, BS)) die("posix_memalign");
    memset(head, 0, BS);
    double tot[NCASES] = {0}, cpu[NCASES] = {0};
    long cnt[NCASES] = {0};
    const off_t P_RAW = 8 << 20, P_REC = 20 << 20;
    double end = clock_us(CLOCK_MONOTONIC) + secs * 1e6;
    for (unsigned round = 0; clock_us(CLOCK_MONOTONIC) < end; round++) {
        uint8_t *obj = malloc(n + 64); /* a new allocation each round (its pages are a new draw) */
        if (!obj) die("malloc");
        for (size_t i = 0; i + 8 <= n + 64; i += 8) {
            uint64_t v = (i + round) * 0x9E3779B97F4A7C15ull;
            memcpy(obj + i, &v, 8);
        }
        uint8_t *data = obj + 32;         /* where a bytes object's bytes start in its allocation */
        size_t k = (-(uintptr_t)data) % BS; /* bytes before the first block-aligned address */
        uint8_t *al = data + k;
        size_t rest = n - k, whole = rest / BS * BS, part = rest - whole, ch = whole / 2 / BS * BS;
        memcpy(tail, al + whole, part);
        memset(tail + part, 0, BS - part);
        for (int turn = 0; turn < 10; turn++) {
            int order[NCASES];
            for (int i = 0; i < NCASES; i++) order[i] = i;
            for (int i = NCASES - 1; i > 0; i--) {
                int j = rand() % (i + 1), t = order[i];
                order[i] = order[j];
                order[j] = t;
            }
            for (int oi = 0; oi < NCASES; oi++) {
                int c = order[oi];
                double c0 = clock_us(CLOCK_THREAD_CPUTIME_ID), t0 = clock_us(CLOCK_MONOTONIC), t;
                long ops = 0;
                do {
                    struct iovec v[3] = {{head, BS}, {al, whole}, {tail, BS}}; /* the whole record */
                    struct iovec w[2];
                    struct iocb cbs[4], *pp[2];
                    int rc = 0;
                    switch (c) {
                    case 0: /* the same pages' whole blocks and the tail block */
                        rc = pwritev2(fd, v + 1, 2, P_RAW, RWF_DSYNC) < 0;
                        break;
                    case 1:
                        w[0] = (struct iovec){al + ch, whole - ch};
                        w[1] = (struct iovec){tail, BS};
                        prepv(&cbs[0], w, 2, P_REC + BS + ch);
                        rc |= submit1(&cbs[0]);
                        stamp(head, data, n);
                        v[1].iov_len = ch; /* the head and the first chunk */
                        prepv(&cbs[1], v, 2, P_REC);
                        rc |= submit1(&cbs[1]) | reap(2) | fdatasync(fd);
                        break;
                    case 2:
                    case 3:
                        prep(&cbs[0], al, ch, P_REC + BS);
                        prep(&cbs[1], al + ch, whole - ch, P_REC + BS + ch);
                        pp[0] = &cbs[0];
                        pp[1] = &cbs[1];
                        rc |= submit(pp, 2);
                        if (c == 2) stamp(head, data, n);
                        prep(&cbs[2], tail, BS, P_REC + BS + whole);
                        prep(&cbs[3], head, BS, P_REC);
                        pp[0] = &cbs[2];
                        pp[1] = &cbs[3];
                        rc |= submit(pp, 2) | reap(4) | fdatasync(fd);
                        break;
                    case 4:
                        prepv(&cbs[0], v, 3, P_REC);
                        rc |= submit1(&cbs[0]) | reap(1) | fdatasync(fd);
                        break;
                    default:
                        stamp(head, data, n);
                        rc = pwritev2(fd, v, 3, P_REC, RWF_DSYNC) < 0;
                    }
                    if (rc) die(names[c]);
                    ops++;
                    t = clock_us(CLOCK_MONOTONIC);
                } while (t < t0 + 20000);
                tot[c] += t - t0;
                cpu[c] += clock_us(CLOCK_THREAD_CPUTIME_ID) - c0;
                cnt[c] += ops;
            }
        }
        free(obj);
    }
    printf("%-13s %9s %8s %10s\n", "pattern", "us/op", "ratio", "cpu us/op");
    for (int c = 0; c < NCASES; c++)
        printf("%-13s %9.1f %8.3f %10.1f\n", names[c], tot[c] / cnt[c], (tot[0] / cnt[0]) / (tot[c] / cnt[c]),
               cpu[c] / cnt[c]);
    return 0;
}
