/* Where a small checkpoint's time goes at the device, timed in C next to the raw write the
 * benchmark compares it with (README "Checkpoint speed": "Where a 4 KiB checkpoint's time goes,
 * step by step").
 *
 * A single-sync checkpoint of an N-byte state writes one record: a header (64 bytes, then the
 * envelope and the stage's name: HDR bytes in all) and the state, in whole blocks, durably, at one
 * of two slots in turn. Against the best raw write of the N bytes (an aligned buffer, written as it
 * is) it pays for a longer write, for alternating places, for bytes the CPU has just written (the
 * record buffer's copy of the state: a virtual disk's host reads them out of this CPU's cache),
 * and for the CRC. This harness times each step on its own, in 20 ms turns taken in a random
 * order:
 *
 *   raw             pwritev2 RWF_DSYNC of the state's blocks from an aligned buffer, one place
 *                   (the benchmark's best raw write)
 *   record          the record's size (HDR + N, rounded up to blocks), one place
 *   record_2places  the record's size at two places one slot apart, in turn (a checkpoint's slots)
 *   fresh_copy      record_2places, the state copied into the buffer (memcpy) before each write
 *   fresh_crc       fresh_copy with the copy made by gf_crc32c_copy (the CRC rides along)
 *   lane_copy       gf_lane_write through a COPY lane: what checkpoint() of a bytes state calls
 *   lane_direct     gf_lane_write through a DIRECT lane: checkpoint() of an aligned buffer (the
 *                   state written where it lies after a header block; its bytes not rewritten)
 *
 * and prints each one's mean time per op, its ratio to raw (raw's time / its time) and its thread
 * CPU time per op. Build and run (the file's first 1 MiB is overwritten):
 *
 *   gcc -O2 -o /tmp/checkpoint_floor tools/checkpoint_floor.c native/gf_crc.c -I native -lpthread
 *   /tmp/checkpoint_floor FILE [SECONDS [BYTES [HDR]]]
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include "gf_crc.h"

#define BS 4096
#define NCASES 7
#define FILE_BYTES (1u << 20)
static const char *names[NCASES] = {"raw",        "record",    "record_2places", "fresh_copy",
                                    "fresh_crc", "lane_copy", "lane_direct"};

static double clock_us(clockid_t id) {
    struct timespec t;
    clock_gettime(id, &t);
    return t.tv_sec * 1e6 + t.tv_nsec / 1e3;
}

static void die(const char *what) {
    perror(what);
    exit(1);
}

static uint8_t *aligned(size_t n) {
    void *p;
    if (posix_memalign(&p, BS, n)) die("posix_memalign");
    memset(p, 0, n);
    return p;
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: %s FILE [SECONDS [BYTES [HDR]]]\n", argv[0]);
        return 2;
    }
    double secs = argc > 2 ? atof(argv[2]) : 20;
    size_t n = argc > 3 ? (size_t)atoll(argv[3]) : 4096;
    size_t hdr = argc > 4 ? (size_t)atoll(argv[4]) : 93; /* 64 + the envelope (24) + "bench" */
    if (n < 1 || n > (64u << 10) || hdr < GF_SLOT_DATA_OFFSET || hdr > 1024) {
        fprintf(stderr, "BYTES must be within 1 B-64 KiB and HDR within 64-1024\n");
        return 2;
    }
    size_t raw_len = (n + BS - 1) / BS * BS, rec_len = (hdr + n + BS - 1) / BS * BS;
    const off_t slot_at[2] = {0, 256 << 10}, raw_at = 512 << 10;
    int fd = open(argv[1], O_RDWR | O_CREAT | O_DIRECT, 0600);
    if (fd < 0) die("open (O_DIRECT)");
    uint8_t *zero = aligned(FILE_BYTES);
    if (pwrite(fd, zero, FILE_BYTES, 0) != (ssize_t)FILE_BYTES || fsync(fd)) die("preparing the file");
    free(zero);

    /* the state as a program holds it (a bytes object's bytes start 32 bytes into its allocation),
     * three versions of it, so that every copy writes other bytes than the last */
    uint8_t *obj = malloc(3 * n + 64), *state[3];
    if (!obj) die("malloc");
    for (size_t i = 0; i < 3 * n + 64; i++) obj[i] = (uint8_t)(i * 2654435761u >> 13);
    for (int v = 0; v < 3; v++) state[v] = obj + 32 + (size_t)v * n;
    uint8_t *rawbuf = aligned(raw_len), *recbuf = aligned(rec_len), *lanebuf = aligned(rec_len);
    memcpy(rawbuf, state[0], n);
    memcpy(recbuf, state[0], n);

    /* the lanes, as RecordLane fills them (slots.py) */
    uint8_t *hdrbytes = aligned(BS), *tail = aligned(BS), *userbuf = aligned(raw_len);
    memcpy(userbuf, state[0], n);
    memset(hdrbytes, 0x5A, hdr); /* a header's fields: their values do not matter here */
    const uint8_t *parts[2] = {hdrbytes + GF_SLOT_DATA_OFFSET, state[0]}; /* the envelope, the state */
    uint64_t lens[2] = {hdr - GF_SLOT_DATA_OFFSET, n};
    gf_lane copy, direct;
    memset(&copy, 0, sizeof copy);
    copy.gate = gf_gate_new();
    if (!copy.gate) die("gf_gate_new");
    copy.gen = gf_gate_gen(copy.gate);
    copy.hdr = hdrbytes;
    copy.hdr_len = hdr;
    copy.kind = GF_LANE_COPY;
    copy.pos[0] = slot_at[0];
    copy.pos[1] = slot_at[1];
    copy.fd = fd;
    copy.dsync = 1;
    copy.block = BS;
    copy.buf = lanebuf;
    copy.nbytes = rec_len;
    copy.parts = parts;
    copy.lens = lens;
    copy.nparts = 2;
    direct = copy;
    direct.kind = GF_LANE_DIRECT;
    direct.hdr_len = BS;
    direct.data = userbuf;
    direct.data_len = n;
    direct.tail = tail;

    double tot[NCASES] = {0}, cpu[NCASES] = {0};
    long cnt[NCASES] = {0};
    uint64_t seq = 0;
    double end = clock_us(CLOCK_MONOTONIC) + secs * 1e6;
    while (clock_us(CLOCK_MONOTONIC) < end) {
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
                unsigned slot = (unsigned)(++seq & 1);
                const uint8_t *src = state[seq % 3];
                struct iovec one = {c == 0 ? rawbuf : recbuf, c == 0 ? raw_len : rec_len};
                int rc = 0;
                switch (c) {
                case 0:
                    rc = pwritev2(fd, &one, 1, raw_at, RWF_DSYNC) < 0;
                    break;
                case 1:
                    rc = pwritev2(fd, &one, 1, slot_at[0], RWF_DSYNC) < 0;
                    break;
                case 2:
                    rc = pwritev2(fd, &one, 1, slot_at[slot], RWF_DSYNC) < 0;
                    break;
                case 3:
                    memcpy(recbuf + hdr, src, n);
                    rc = pwritev2(fd, &one, 1, slot_at[slot], RWF_DSYNC) < 0;
                    break;
                case 4: {
                    uint32_t crc = gf_crc32c_copy(recbuf + hdr, src, n, 0);
                    memcpy(recbuf + 32, &crc, 4); /* where a record header keeps it */
                    rc = pwritev2(fd, &one, 1, slot_at[slot], RWF_DSYNC) < 0;
                    break;
                }
                case 5:
                    parts[1] = src; /* as a new bytes state of the lane's length would be */
                    rc = gf_lane_write(&copy, seq, slot, 0, 0, INT64_MAX) != 0;
                    break;
                default:
                    rc = gf_lane_write(&direct, seq, slot, 0, 0, INT64_MAX) != 0;
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
    printf("%-16s %10s %7s %8s   (%zu-byte state, %zu-byte header: record %zu bytes, raw %zu)\n", "case",
           "us/op", "ratio", "cpu_us", n, hdr, rec_len, raw_len);
    double raw = tot[0] / cnt[0];
    for (int c = 0; c < NCASES; c++) {
        double us = tot[c] / cnt[c];
        printf("%-16s %10.2f %7.3f %8.2f\n", names[c], us, raw / us, cpu[c] / cnt[c]);
    }
    gf_gate_free(copy.gate);
    close(fd);
    return 0;
}
