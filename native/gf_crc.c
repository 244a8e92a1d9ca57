/* gf_crc32c_copy / gf_crc32c: see gf_crc.h.
 *
 * CRC32C register arithmetic: the reflected polynomial 0x82F63B78, register
 * preset to ~crc and inverted at the end, so results chain like zlib's crc32.
 * The hardware path runs three independent crc32q chains over three adjacent
 * stretches of STRETCH bytes (the instruction has a latency of three cycles
 * and a throughput of one), copying each 8-byte word as it is consumed, then
 * joins the three registers: feeding a register STRETCH zero bytes is a linear
 * map over GF(2), tabulated once (four tables of 256 entries, one per byte of
 * the register) from its action on the 32 one-bit registers. Where the CPU has
 * AVX-512 and VPCLMULQDQ, runs of VPCLMUL_MIN bytes or more fold 256 bytes a
 * step with carry-less multiplies instead (vpclmul_run, below: about 2.8x the
 * crc32 streams' speed at 1 MiB here, and the copy rides along for free). */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE /* pwritev2, RWF_DSYNC */
#endif
#include "gf_crc.h"
#include "gf_native.h" /* gf_native_api.h (the cdef) declares these too: the compiler checks they agree */

#include <errno.h>
#include <linux/aio_abi.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>

#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define POLY 0x82F63B78u
#define STRETCH 2048u /* bytes per chain per round: 3 * 2048 = 6 KiB a round */
#define VPCLMUL_MIN 512u /* shorter runs stay on the crc32 instruction (the folds' setup is not worth it) */

static uint32_t byte_table[256];
static uint32_t shift_table[4][256]; /* register after STRETCH zero bytes, by byte of the register */
static int have_hw;
static pthread_once_t once = PTHREAD_ONCE_INIT;

static uint32_t sw_update(uint32_t reg, const uint8_t *p, uint64_t n) {
    while (n--) reg = byte_table[(reg ^ *p++) & 0xff] ^ (reg >> 8);
    return reg;
}

static uint32_t sw_copy(uint8_t *dst, const uint8_t *src, uint64_t n, uint32_t reg) {
    while (n--) {
        uint8_t b = *src++;
        *dst++ = b;
        reg = byte_table[(reg ^ b) & 0xff] ^ (reg >> 8);
    }
    return reg;
}

static uint32_t shift_stretch(uint32_t reg) {
    return shift_table[0][reg & 0xff] ^ shift_table[1][(reg >> 8) & 0xff] ^ shift_table[2][(reg >> 16) & 0xff] ^
           shift_table[3][reg >> 24];
}

#if defined(__x86_64__)
#include <nmmintrin.h>

__attribute__((target("sse4.2"))) static uint32_t hw_zeros(uint32_t reg, uint64_t n) {
    uint64_t r = reg;
    for (uint64_t i = 0; i < n / 8; i++) r = _mm_crc32_u64(r, 0);
    return (uint32_t)r;
}

/* One pass: copy (when dst) and checksum; reg is the raw register. */
__attribute__((target("sse4.2"))) static uint32_t hw_run(uint8_t *dst, const uint8_t *src, uint64_t n,
                                                         uint32_t reg) {
    uint64_t r0 = reg;
    while (n >= 3 * STRETCH) {
        const uint8_t *s0 = src, *s1 = src + STRETCH, *s2 = src + 2 * STRETCH;
        uint64_t r1 = 0, r2 = 0;
        if (dst) {
            uint8_t *d0 = dst, *d1 = dst + STRETCH, *d2 = dst + 2 * STRETCH;
            for (uint32_t i = 0; i < STRETCH; i += 8) {
                uint64_t w0, w1, w2;
                memcpy(&w0, s0 + i, 8);
                memcpy(&w1, s1 + i, 8);
                memcpy(&w2, s2 + i, 8);
                r0 = _mm_crc32_u64(r0, w0);
                r1 = _mm_crc32_u64(r1, w1);
                r2 = _mm_crc32_u64(r2, w2);
                memcpy(d0 + i, &w0, 8);
                memcpy(d1 + i, &w1, 8);
                memcpy(d2 + i, &w2, 8);
            }
            dst += 3 * STRETCH;
        } else {
            for (uint32_t i = 0; i < STRETCH; i += 8) {
                uint64_t w0, w1, w2;
                memcpy(&w0, s0 + i, 8);
                memcpy(&w1, s1 + i, 8);
                memcpy(&w2, s2 + i, 8);
                r0 = _mm_crc32_u64(r0, w0);
                r1 = _mm_crc32_u64(r1, w1);
                r2 = _mm_crc32_u64(r2, w2);
            }
        }
        r0 = shift_stretch(shift_stretch((uint32_t)r0) ^ (uint32_t)r1) ^ (uint32_t)r2;
        src += 3 * STRETCH;
        n -= 3 * STRETCH;
    }
    while (n >= 8) {
        uint64_t w;
        memcpy(&w, src, 8);
        r0 = _mm_crc32_u64(r0, w);
        if (dst) {
            memcpy(dst, &w, 8);
            dst += 8;
        }
        src += 8;
        n -= 8;
    }
    while (n--) {
        uint8_t b = *src++;
        r0 = _mm_crc32_u8((uint32_t)r0, b);
        if (dst) *dst++ = b;
    }
    return (uint32_t)r0;
}
#endif

#if defined(__x86_64__)
#include <immintrin.h>

/* Folding with carry-less multiplies (VPCLMULQDQ on 512-bit registers: 4 lanes of 128 bits).
 *
 * Bit order: CRC32C is reflected, so the first byte's lowest bit is the message polynomial's
 * highest coefficient. A 128-bit lane loaded from 16 message bytes holds A(x) = L(x) x^64 + H(x),
 * L from bytes 0-7 and H from bytes 8-15, bit i of each 64-bit half the coefficient of x^(63-i).
 * A lane that lies D bits before the data it is folded into contributes A(x) x^D, and modulo P
 * that is L(x) (x^(D+64) mod P) + H(x) (x^D mod P): two 64 x 33-bit carry-less products.
 * clmul(a, c) puts a_i c_j at bit i+j, which the lane convention reads as x^(127-i-j); with a_i
 * the coefficient of x^(63-i) the constant's bit j must be that of x^(64-j): for K = x^n mod P
 * that is rev64(x^(n-1) mod P) (bit 63-e for the term x^e, the factor x restoring the degree).
 * The sum stays below x^96, so a lane never overflows, and XOR-ing the next lane of data in is
 * the fold. At the end the one 128-bit lane left is congruent to everything folded so far, so the
 * register is the CRC of those 16 bytes from a zero register (the crc32 instruction finishes it),
 * then the bytes after them. The caller's register goes in by XOR into the first 4 bytes (a CRC
 * register is what those 32 bits would have left behind). All constants are computed at init
 * from P, and the tests compare every length and offset with the crc32c package. */
#define FOLD_BLOCK 256u /* bytes per loop: four 512-bit accumulators */

static __m128i k_fold2048, k_fold1536, k_fold1024, k_fold512, k_fold384, k_fold256, k_fold128;
static int have_vpclmul;

static uint64_t xpow_mod(uint32_t n) { /* x^n mod P, P in the normal (unreflected) bit order */
    uint64_t r = 1;
    while (n--) {
        r <<= 1;
        if (r >> 32) r ^= 0x11EDC6F41ull;
    }
    return r;
}

static uint64_t rev64(uint64_t v) {
    uint64_t r = 0;
    for (int i = 0; i < 64; i++) r |= ((v >> i) & 1) << (63 - i);
    return r;
}

/* The pair of constants that folds a lane D bits forward: low qword for L, high qword for H. */
static __m128i fold_pair(uint32_t d) {
    return _mm_set_epi64x((long long)rev64(xpow_mod(d - 1)), (long long)rev64(xpow_mod(d + 63)));
}

/* always inlined, at -O1 too: a call would pass the vectors in zmm registers and return without
 * vzeroupper (tests/whitebox/test_native_vectors.py) */
#define GF_FOLD_TARGET __attribute__((target("avx512f,avx512vl,avx512bw,vpclmulqdq,pclmul"), always_inline))
GF_FOLD_TARGET static inline __m512i fold512(__m512i a, __m512i k) {
    __m512i lo = _mm512_clmulepi64_epi128(a, k, 0x00); /* L times the constant for x^(D+64) */
    __m512i hi = _mm512_clmulepi64_epi128(a, k, 0x11); /* H times the constant for x^D */
    return _mm512_xor_si512(lo, hi);
}

GF_FOLD_TARGET static inline __m128i fold128(__m128i a, __m128i k) {
    return _mm_xor_si128(_mm_clmulepi64_si128(a, k, 0x00), _mm_clmulepi64_si128(a, k, 0x11));
}

/* Like hw_run, for n >= FOLD_BLOCK: copy (when dst) and checksum; reg is the raw register. */
__attribute__((target("avx512f,avx512vl,avx512bw,vpclmulqdq,pclmul,sse4.2"))) static uint32_t
vpclmul_run(uint8_t *dst, const uint8_t *src, uint64_t n, uint32_t reg) {
    __m512i a0 = _mm512_loadu_si512((const void *)src), a1 = _mm512_loadu_si512((const void *)(src + 64)),
            a2 = _mm512_loadu_si512((const void *)(src + 128)), a3 = _mm512_loadu_si512((const void *)(src + 192));
    if (dst) {
        _mm512_storeu_si512((void *)dst, a0);
        _mm512_storeu_si512((void *)(dst + 64), a1);
        _mm512_storeu_si512((void *)(dst + 128), a2);
        _mm512_storeu_si512((void *)(dst + 192), a3);
        dst += FOLD_BLOCK;
    }
    a0 = _mm512_xor_si512(a0, _mm512_castsi128_si512(_mm_cvtsi32_si128((int)reg)));
    src += FOLD_BLOCK;
    n -= FOLD_BLOCK;
    const __m512i k4 = _mm512_broadcast_i32x4(k_fold2048);
    while (n >= FOLD_BLOCK) {
        __m512i b0 = _mm512_loadu_si512((const void *)src), b1 = _mm512_loadu_si512((const void *)(src + 64)),
                b2 = _mm512_loadu_si512((const void *)(src + 128)),
                b3 = _mm512_loadu_si512((const void *)(src + 192));
        if (dst) {
            _mm512_storeu_si512((void *)dst, b0);
            _mm512_storeu_si512((void *)(dst + 64), b1);
            _mm512_storeu_si512((void *)(dst + 128), b2);
            _mm512_storeu_si512((void *)(dst + 192), b3);
            dst += FOLD_BLOCK;
        }
        a0 = _mm512_xor_si512(fold512(a0, k4), b0);
        a1 = _mm512_xor_si512(fold512(a1, k4), b1);
        a2 = _mm512_xor_si512(fold512(a2, k4), b2);
        a3 = _mm512_xor_si512(fold512(a3, k4), b3);
        src += FOLD_BLOCK;
        n -= FOLD_BLOCK;
    }
    /* four accumulators into one: a0 lies 1536 bits before a3, a1 1024, a2 512 */
    __m512i acc = _mm512_xor_si512(fold512(a0, _mm512_broadcast_i32x4(k_fold1536)),
                                   fold512(a1, _mm512_broadcast_i32x4(k_fold1024)));
    acc = _mm512_xor_si512(acc, fold512(a2, _mm512_broadcast_i32x4(k_fold512)));
    acc = _mm512_xor_si512(acc, a3);
    /* four lanes into one: lane 0 lies 384 bits before lane 3, lane 1 256, lane 2 128 */
    __m128i l0 = _mm512_extracti32x4_epi32(acc, 0), l1 = _mm512_extracti32x4_epi32(acc, 1),
            l2 = _mm512_extracti32x4_epi32(acc, 2), l3 = _mm512_extracti32x4_epi32(acc, 3);
    __m128i x = _mm_xor_si128(fold128(l0, k_fold384), fold128(l1, k_fold256));
    x = _mm_xor_si128(x, fold128(l2, k_fold128));
    x = _mm_xor_si128(x, l3);
    while (n >= 16) { /* whole lanes left */
        __m128i b = _mm_loadu_si128((const __m128i *)src);
        if (dst) {
            _mm_storeu_si128((__m128i *)dst, b);
            dst += 16;
        }
        x = _mm_xor_si128(fold128(x, k_fold128), b);
        src += 16;
        n -= 16;
    }
    uint64_t r = _mm_crc32_u64(0, (uint64_t)_mm_cvtsi128_si64(x));
    r = _mm_crc32_u64(r, (uint64_t)_mm_extract_epi64(x, 1));
    /* Leave the upper halves of the vector registers clean (GCC inserted no vzeroupper here):
     * dirty ones slowed the whole process afterwards, its system calls included, by about 5%
     * (README "Checkpoint speed": the raw writes of the same run, not only the checkpoints). */
    _mm256_zeroupper();
    return hw_run(dst, src, n, (uint32_t)r);
}
#endif

static void init_tables(void) {
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++) c = c & 1 ? (c >> 1) ^ POLY : c >> 1;
        byte_table[i] = c;
    }
#if defined(__x86_64__)
    __builtin_cpu_init();
    have_hw = __builtin_cpu_supports("sse4.2");
    have_vpclmul = have_hw && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
                   __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("vpclmulqdq") &&
                   __builtin_cpu_supports("pclmul");
    if (getenv("GRAFOS_CRC_NO_VPCLMUL")) have_vpclmul = 0; /* the three-stream crc32 path, for comparison */
    k_fold2048 = fold_pair(2048);
    k_fold1536 = fold_pair(1536);
    k_fold1024 = fold_pair(1024);
    k_fold512 = fold_pair(512);
    k_fold384 = fold_pair(384);
    k_fold256 = fold_pair(256);
    k_fold128 = fold_pair(128);
#endif
    uint32_t basis[32];
    static const uint8_t zeros[64];
    for (int bit = 0; bit < 32; bit++) {
        uint32_t reg = 1u << bit;
#if defined(__x86_64__)
        if (have_hw) {
            basis[bit] = hw_zeros(reg, STRETCH);
            continue;
        }
#endif
        for (uint32_t done = 0; done < STRETCH; done += sizeof zeros) reg = sw_update(reg, zeros, sizeof zeros);
        basis[bit] = reg;
    }
    for (int k = 0; k < 4; k++) {
        for (uint32_t b = 0; b < 256; b++) {
            uint32_t v = 0;
            for (int j = 0; j < 8; j++)
                if (b >> j & 1) v ^= basis[8 * k + j];
            shift_table[k][b] = v;
        }
    }
}

uint32_t gf_crc32c_copy(uint8_t *dst, const uint8_t *src, uint64_t len, uint32_t crc) {
    pthread_once(&once, init_tables);
    uint32_t reg = ~crc;
#if defined(__x86_64__)
    if (have_vpclmul && len >= VPCLMUL_MIN) return ~vpclmul_run(dst, src, len, reg);
    if (have_hw) return ~hw_run(dst, src, len, reg);
#endif
    return ~(dst ? sw_copy(dst, src, len, reg) : sw_update(reg, src, len));
}

uint32_t gf_crc32c(const uint8_t *buf, uint64_t len, uint32_t crc) { return gf_crc32c_copy(NULL, buf, len, crc); }

int gf_crc32c_impl(void) {
    pthread_once(&once, init_tables);
#if defined(__x86_64__)
    if (have_vpclmul) return 2;
#endif
    return have_hw ? 1 : 0;
}

/* ---- slot records: build, checksum and write in one call (gf_crc.h) ---- */

#ifndef RWF_DSYNC
#define RWF_DSYNC 0x00000002
#endif

int gf_aio_setup(uint32_t nr_events, uint64_t *ctx) {
    aio_context_t c = 0;
    if (syscall(SYS_io_setup, nr_events, &c) < 0) return -errno;
    *ctx = (uint64_t)c;
    return 0;
}

int gf_aio_destroy(uint64_t ctx) { return syscall(SYS_io_destroy, (aio_context_t)ctx) < 0 ? -errno : 0; }

static void put_u32le(uint8_t *p, uint32_t v) {
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
    p[2] = (uint8_t)(v >> 16);
    p[3] = (uint8_t)(v >> 24);
}

/* The whole of iov[0, niov) at pos, durably (RWF_DSYNC when dsync, else + fdatasync), short writes
 * continued; iov is consumed. 0 or -errno. */
static int writev_sync(int fd, int64_t pos, struct iovec *iov, int niov, int dsync) {
    int flag = dsync ? RWF_DSYNC : 0, synced = 0;
    while (niov) {
        ssize_t n = pwritev2(fd, iov, niov, (off_t)pos, flag);
        if (n < 0) {
            if (errno == EINTR) continue;
            if (flag && (errno == EOPNOTSUPP || errno == EINVAL)) { /* the flag refused: write + fdatasync */
                flag = 0;
                continue;
            }
            return -errno;
        }
        if (n == 0) return -EIO;
        pos += n;
        synced = flag != 0;
        size_t left = (size_t)n;
        while (niov && left >= iov->iov_len) {
            left -= iov->iov_len;
            iov++;
            niov--;
        }
        if (niov && left) {
            iov->iov_base = (uint8_t *)iov->iov_base + left;
            iov->iov_len -= left;
        }
        if (niov) synced = 0; /* short: what landed is durable, the rest needs the flush */
    }
    if (!synced) {
        while (fdatasync(fd) < 0)
            if (errno != EINTR) return -errno;
    }
    return 0;
}

/* The whole buffer, durably (writev_sync of one piece); 0 or -errno. */
static int write_sync(int fd, int64_t pos, const uint8_t *buf, uint64_t nbytes, int dsync) {
    struct iovec iov = {(void *)buf, (size_t)nbytes};
    return writev_sync(fd, pos, &iov, 1, dsync);
}

/* One write request of len bytes from buf at off, completion tagged idx. */
static void prep_write(struct iocb *cb, uint64_t idx, int fd, const uint8_t *buf, uint64_t len, int64_t off) {
    memset(cb, 0, sizeof *cb);
    cb->aio_data = idx;
    cb->aio_lio_opcode = IOCB_CMD_PWRITE;
    cb->aio_fildes = (uint32_t)fd;
    cb->aio_buf = (uint64_t)(uintptr_t)buf;
    cb->aio_nbytes = len;
    cb->aio_offset = off;
}

/* One vectored write request of the niov buffers in iov at off, completion tagged idx. */
static void prep_writev(struct iocb *cb, uint64_t idx, int fd, const struct iovec *iov, int niov, int64_t off) {
    memset(cb, 0, sizeof *cb);
    cb->aio_data = idx;
    cb->aio_lio_opcode = IOCB_CMD_PWRITEV;
    cb->aio_fildes = (uint32_t)fd;
    cb->aio_buf = (uint64_t)(uintptr_t)iov;
    cb->aio_nbytes = (uint64_t)niov;
    cb->aio_offset = off;
}

/* Reaps `want` completions; *bad set when one failed or came up short. 0 or -errno (then nothing
 * more can be reaped: the context is broken, which io_getevents only reports for a bad context). */
static int reap(aio_context_t ctx, long want, const uint64_t *expect, int *bad) {
    struct io_event ev[GF_SLOT_MAX_AIO + 2];
    while (want > 0) {
        long got = syscall(SYS_io_getevents, ctx, 1L, want, ev, NULL);
        if (got < 0) {
            if (errno == EINTR) continue;
            return -errno;
        }
        for (long i = 0; i < got; i++) {
            uint64_t idx = ev[i].data;
            if (ev[i].res < 0 || idx >= GF_SLOT_MAX_AIO + 2 || (uint64_t)ev[i].res != expect[idx]) *bad = 1;
        }
        want -= got;
    }
    return 0;
}

/* Reaps the `inflight` requests; when they cannot be reaped (never seen: io_getevents fails only on
 * bad arguments) they must still end before the buffers are reused: io_destroy cancels or waits for
 * every one of them. Returns 1 when the context was destroyed, else 0 (*bad as reap sets it). */
static int reap_or_end(aio_context_t ctx, long inflight, const uint64_t *expect, int *bad) {
    if (!inflight || reap(ctx, inflight, expect, bad) == 0) return 0;
    syscall(SYS_io_destroy, ctx);
    return 1;
}

/* gf_slot_write, where *zeroed says buf's bytes after the data are already zero (a lane's: see
 * gf_lane.zeroed); it is set once they are. NULL: zero them every time. */
static int slot_write_copy(int fd, int64_t pos, uint8_t *buf, uint64_t nbytes, uint64_t block,
                           const uint8_t *header, const uint8_t *const *parts, const uint64_t *lens, uint32_t nparts,
                           uint64_t aio_ctx, uint64_t chunk, int dsync, uint32_t *zeroed) {
    uint64_t n = 0;
    for (uint32_t i = 0; i < nparts; i++) {
        if (lens[i] > nbytes) return -EINVAL;
        n += lens[i];
    }
    if (block < 512 || (block & (block - 1)) || nbytes % block || nbytes < block || n > nbytes - GF_SLOT_DATA_OFFSET ||
        pos < 0)
        return -EINVAL;
    int use_aio = aio_ctx != 0 && nbytes > chunk && chunk >= block && chunk % block == 0;
    while (use_aio && (nbytes - block) / chunk + 2 > GF_SLOT_MAX_AIO) chunk *= 2; /* a large record: fewer, larger */
    aio_context_t ctx = (aio_context_t)aio_ctx;
    struct iocb cbs[GF_SLOT_MAX_AIO + 2];
    uint64_t expect[GF_SLOT_MAX_AIO + 2];
    long inflight = 0, nreq = 0;
    int aio_failed = 0;
    uint64_t at = GF_SLOT_DATA_OFFSET, sent = block; /* block 0 (the header) goes last */
    uint32_t crc = 0;

    memcpy(buf, header, GF_SLOT_HEADER_FIELDS);
    memset(buf + GF_SLOT_HEADER_FIELDS, 0, GF_SLOT_DATA_OFFSET - GF_SLOT_HEADER_FIELDS);
    for (uint32_t i = 0; i < nparts; i++) {
        uint64_t off = 0;
        while (off < lens[i]) {
            uint64_t step = lens[i] - off;
            if (use_aio && step > chunk) step = chunk;
            /* stop the copy exactly where the next request ends (block aligned): the first request
             * goes out after `chunk - block` bytes are copied, not two steps (2 * chunk) later */
            if (use_aio && !aio_failed && sent + chunk > at && step > sent + chunk - at) step = sent + chunk - at;
            crc = gf_crc32c_copy(buf + at, parts[i] + off, step, crc);
            at += step;
            off += step;
            if (use_aio && !aio_failed && at / block * block >= sent + chunk) {
                uint64_t end = at / block * block, len = end - sent;
                struct iocb *cb = &cbs[nreq];
                prep_write(cb, (uint64_t)nreq, fd, buf + sent, len, pos + (int64_t)sent);
                expect[nreq] = len;
                struct iocb *one[1] = {cb};
                if (syscall(SYS_io_submit, ctx, 1L, one) == 1) {
                    nreq++;
                    inflight++;
                    sent = end;
                } else {
                    aio_failed = 1;
                }
            }
        }
    }
    if (!zeroed || !*zeroed) memset(buf + at, 0, nbytes - at);
    if (zeroed) *zeroed = 1;
    put_u32le(buf + GF_SLOT_DATA_CRC_AT, crc);
    put_u32le(buf + GF_SLOT_HEADER_CRC_AT, gf_crc32c(buf, GF_SLOT_HEADER_CRC_AT, 0));
    if (!use_aio) return write_sync(fd, pos, buf, nbytes, dsync);

    struct iocb *last[2];
    long nlast = 0;
    if (!aio_failed) {
        if (sent < nbytes) { /* the rest of the data blocks */
            prep_write(&cbs[nreq], (uint64_t)nreq, fd, buf + sent, nbytes - sent, pos + (int64_t)sent);
            expect[nreq] = nbytes - sent;
            last[nlast++] = &cbs[nreq++];
        }
        prep_write(&cbs[nreq], (uint64_t)nreq, fd, buf, block, pos); /* the header block */
        expect[nreq] = block;
        last[nlast++] = &cbs[nreq++];
        long got = syscall(SYS_io_submit, ctx, nlast, last);
        if (got < 0) got = 0;
        inflight += got;
        if (got < nlast) aio_failed = 1;
    }
    int bad = 0, destroyed = reap_or_end(ctx, inflight, expect, &bad);
    if (aio_failed || bad || destroyed) {
        int rc = write_sync(fd, pos, buf, nbytes, dsync);
        return rc < 0 ? rc : 1 + destroyed;
    }
    while (fdatasync(fd) < 0)
        if (errno != EINTR) return -errno;
    return 0;
}

int gf_slot_write(int fd, int64_t pos, uint8_t *buf, uint64_t nbytes, uint64_t block, const uint8_t *header,
                  const uint8_t *const *parts, const uint64_t *lens, uint32_t nparts, uint64_t aio_ctx,
                  uint64_t chunk, int dsync) {
    return slot_write_copy(fd, pos, buf, nbytes, block, header, parts, lens, nparts, aio_ctx, chunk, dsync, NULL);
}

int gf_slot_write_gather(int fd, int64_t pos, const uint8_t *header, const uint8_t *const *parts,
                         const uint64_t *lens, uint32_t nparts, const uint8_t *zeros, uint64_t pad, int dsync) {
    struct iovec iov[1002];
    uint8_t head[GF_SLOT_DATA_OFFSET];
    if (nparts > 1000 || pos < 0) return -EINVAL;
    uint32_t crc = 0, niov = 0;
    memcpy(head, header, GF_SLOT_HEADER_FIELDS);
    iov[niov++] = (struct iovec){head, GF_SLOT_DATA_OFFSET};
    for (uint32_t i = 0; i < nparts; i++) {
        crc = gf_crc32c(parts[i], lens[i], crc);
        if (lens[i]) iov[niov++] = (struct iovec){(void *)parts[i], (size_t)lens[i]};
    }
    if (pad) iov[niov++] = (struct iovec){(void *)zeros, (size_t)pad};
    memset(head + GF_SLOT_HEADER_FIELDS, 0, GF_SLOT_DATA_OFFSET - GF_SLOT_HEADER_FIELDS);
    put_u32le(head + GF_SLOT_DATA_CRC_AT, crc);
    put_u32le(head + GF_SLOT_HEADER_CRC_AT, gf_crc32c(head, GF_SLOT_HEADER_CRC_AT, 0));
    return writev_sync(fd, pos, iov, (int)niov, dsync);
}



int gf_slot_write_direct(int fd, int64_t pos, uint8_t *head, uint64_t head_len, uint64_t block, const uint8_t *data,
                         uint64_t data_len, uint8_t *tail, uint64_t aio_ctx, uint64_t chunk, int dsync) {
    if (block < 512 || (block & (block - 1)) || head_len < block || head_len % block || pos < 0 ||
        ((uintptr_t)head | (uintptr_t)tail) % block || (data_len >= block && (uintptr_t)data % block) ||
        chunk < block || chunk % block)
        return -EINVAL;
    uint64_t whole = data_len / block * block, rest = data_len - whole;
    aio_context_t ctx = (aio_context_t)aio_ctx;
    struct iocb cbs[GF_SLOT_MAX_AIO + 2];
    uint64_t expect[GF_SLOT_MAX_AIO + 2];
    struct iovec last_iov[2], first_iov[2]; /* alive until every request is reaped (below) */
    long inflight = 0, nreq = 0;
    int aio_failed = 0, use_aio = aio_ctx != 0 && whole > 0;
    while (use_aio && whole / chunk + 2 > GF_SLOT_MAX_AIO) chunk *= 2; /* a large state: fewer, larger */
    /* Two chunks or more: the first chunk goes out last, in one request with the head (which
     * needs the CRC), and the tail block with the last chunk: two requests for a 1 MiB state, not
     * four. The device starts on the other chunks at once, while the CRC is computed, so it never
     * waits for the CRC (tools/record_pattern.c, 1 MiB on an ext4 file on virtio-blk, three runs:
     * 1.010, 0.933, 0.928 of a raw O_DIRECT RWF_DSYNC write of the same pages, against 0.968,
     * 0.906, 0.909 with the head and the tail in requests of their own). One chunk: the data
     * first, then the head and the tail. */
    int swap = use_aio && whole > chunk;

    if (rest) { /* the data's last partial block, zero-filled: it needs no CRC, so it is ready first */
        memcpy(tail, data + whole, rest);
        memset(tail + rest, 0, block - rest);
    }
    /* SYNC POINT: record durable. The state's whole blocks go out first, straight from the caller's
     * buffer, and are in flight while the CRC is computed; the header block(s), which need it, go
     * after (with the first chunk, when swap); one flush once every request has landed. Nothing
     * orders the requests among themselves: until all have landed the slot fails a checksum
     * (slots.py's descriptor), which is the reader's side of this point. */
    if (use_aio) {
        struct iocb *one[GF_SLOT_MAX_AIO + 2];
        long want = 0;
        for (uint64_t at = swap ? chunk : 0; at < whole; at += chunk) {
            uint64_t len = whole - at < chunk ? whole - at : chunk;
            if (swap && rest && at + len == whole) { /* the last chunk and the tail block */
                last_iov[0] = (struct iovec){(void *)(data + at), (size_t)len};
                last_iov[1] = (struct iovec){tail, (size_t)block};
                prep_writev(&cbs[nreq], (uint64_t)nreq, fd, last_iov, 2, pos + (int64_t)(head_len + at));
                expect[nreq] = len + block;
            } else {
                prep_write(&cbs[nreq], (uint64_t)nreq, fd, data + at, len, pos + (int64_t)(head_len + at));
                expect[nreq] = len;
            }
            one[want++] = &cbs[nreq++];
        }
        long got = syscall(SYS_io_submit, ctx, want, one);
        if (got < 0) got = 0;
        inflight = got;
        if (got < want) aio_failed = 1;
    }
    uint32_t crc = gf_crc32c(head + GF_SLOT_DATA_OFFSET, head_len - GF_SLOT_DATA_OFFSET, 0);
    crc = gf_crc32c(data, data_len, crc);
    memset(head + GF_SLOT_HEADER_FIELDS, 0, GF_SLOT_DATA_OFFSET - GF_SLOT_HEADER_FIELDS);
    put_u32le(head + GF_SLOT_DATA_CRC_AT, crc);
    put_u32le(head + GF_SLOT_HEADER_CRC_AT, gf_crc32c(head, GF_SLOT_HEADER_CRC_AT, 0));
    if (use_aio && !aio_failed) {
        struct iocb *last[2];
        long nlast = 0;
        if (swap) { /* the head and the first chunk, one request */
            first_iov[0] = (struct iovec){head, (size_t)head_len};
            first_iov[1] = (struct iovec){(void *)data, (size_t)chunk};
            prep_writev(&cbs[nreq], (uint64_t)nreq, fd, first_iov, 2, pos);
            expect[nreq] = head_len + chunk;
            last[nlast++] = &cbs[nreq++];
        } else {
            if (rest) {
                prep_write(&cbs[nreq], (uint64_t)nreq, fd, tail, block, pos + (int64_t)(head_len + whole));
                expect[nreq] = block;
                last[nlast++] = &cbs[nreq++];
            }
            prep_write(&cbs[nreq], (uint64_t)nreq, fd, head, head_len, pos);
            expect[nreq] = head_len;
            last[nlast++] = &cbs[nreq++];
        }
        long got = syscall(SYS_io_submit, ctx, nlast, last);
        if (got < 0) got = 0;
        inflight += got;
        if (got < nlast) aio_failed = 1;
    }
    int bad = 0, destroyed = reap_or_end(ctx, inflight, expect, &bad);
    if (!use_aio || aio_failed || bad || destroyed) {
        struct iovec iov[3];
        int niov = 0;
        iov[niov++] = (struct iovec){head, (size_t)head_len};
        if (whole) iov[niov++] = (struct iovec){(void *)data, (size_t)whole};
        if (rest) iov[niov++] = (struct iovec){tail, (size_t)block};
        int rc = writev_sync(fd, pos, iov, niov, dsync);
        if (rc < 0) return rc;
        return use_aio ? 1 + destroyed : 0;
    }
    while (fdatasync(fd) < 0)
        if (errno != EINTR) return -errno;
    return 0;
}

/* ---- the gate (gf_crc.h) ---- */

struct gf_gate {
    pthread_mutex_t mu; /* held by a write through the gate while it runs, and by gf_gate_shut */
    int shut;
    uint64_t gen; /* gf_gate_bump: lanes made for an older one are stale (gf_lane_write) */
};

void *gf_gate_new(void) {
    struct gf_gate *g = calloc(1, sizeof *g);
    if (!g) return NULL;
    if (pthread_mutex_init(&g->mu, NULL)) {
        free(g);
        return NULL;
    }
    return g;
}

void gf_gate_shut(void *gate) {
    struct gf_gate *g = gate;
    if (!g) return;
    pthread_mutex_lock(&g->mu); /* waits for the write in the gate, if any */
    g->shut = 1;
    pthread_mutex_unlock(&g->mu);
}

uint64_t gf_gate_gen(void *gate) {
    struct gf_gate *g = gate;
    if (!g) return 0;
    pthread_mutex_lock(&g->mu);
    uint64_t gen = g->gen;
    pthread_mutex_unlock(&g->mu);
    return gen;
}

void gf_gate_bump(void *gate) {
    struct gf_gate *g = gate;
    if (!g) return;
    pthread_mutex_lock(&g->mu); /* waits for the write in the gate, if any */
    g->gen++;
    pthread_mutex_unlock(&g->mu);
}

void gf_gate_free(void *gate) {
    struct gf_gate *g = gate;
    if (!g) return;
    pthread_mutex_destroy(&g->mu);
    free(g);
}

static void put_u64le(uint8_t *p, uint64_t v) {
    put_u32le(p, (uint32_t)v);
    put_u32le(p + 4, (uint32_t)(v >> 32));
}

/* SYNC POINT: descriptor closed. The write runs with the mutex held and only while the gate is
 * open; gf_gate_shut takes the same mutex before the caller closes the descriptor. */
#define GF_GATED(gate, call)                                                                                          \
    do {                                                                                                           \
        struct gf_gate *g_ = (gate);                                                                               \
        if (!g_) return -EINVAL;                                                                                   \
        if (hdr) {                                                                                                 \
            put_u64le(hdr + GF_SLOT_SEQ_AT, seq);                                                                  \
            put_u32le(hdr + GF_SLOT_SLOT_AT, slot);                                                                \
        }                                                                                                          \
        pthread_mutex_lock(&g_->mu);                                                                               \
        int rc_ = g_->shut ? -EBADF : (call);                                                                      \
        pthread_mutex_unlock(&g_->mu);                                                                             \
        return rc_;                                                                                                \
    } while (0)

int gf_slot_write_gated(uint64_t seq, void *gate, uint8_t *hdr, uint32_t slot, int fd, int64_t pos, uint8_t *buf,
                        uint64_t nbytes, uint64_t block, const uint8_t *header, const uint8_t *const *parts, const uint64_t *lens, uint32_t nparts,
                        uint64_t aio_ctx, uint64_t chunk, int dsync) {
    GF_GATED(gate, gf_slot_write(fd, pos, buf, nbytes, block, header, parts, lens, nparts, aio_ctx, chunk, dsync));
}

int gf_slot_write_gather_gated(uint64_t seq, void *gate, uint8_t *hdr, uint32_t slot, int fd, int64_t pos,
                               const uint8_t *header, const uint8_t *const *parts, const uint64_t *lens, uint32_t nparts, const uint8_t *zeros, uint64_t pad, int dsync) {
    GF_GATED(gate, gf_slot_write_gather(fd, pos, header, parts, lens, nparts, zeros, pad, dsync));
}

int gf_slot_write_direct_gated(uint64_t seq, void *gate, uint8_t *hdr, uint32_t slot, int fd, int64_t pos,
                               uint8_t *head, uint64_t head_len, uint64_t block, const uint8_t *data, uint64_t data_len, uint8_t *tail, uint64_t aio_ctx,
                               uint64_t chunk, int dsync) {
    GF_GATED(gate, gf_slot_write_direct(fd, pos, head, head_len, block, data, data_len, tail, aio_ctx, chunk, dsync));
}

/* ---- record lanes (gf_crc.h) ---- */

/* Whether the lane's fields describe a write the three functions above would accept the shape of
 * (they check the rest themselves: alignment, lengths against nbytes, nparts). */
static int lane_shape_ok(const gf_lane *l) {
    if (!l->gate || !l->hdr || l->hdr_len < GF_SLOT_DATA_OFFSET || l->pos[0] < 0 || l->pos[1] < 0) return 0;
    for (int i = 0; i < 2; i++)
        if (l->at[i] && (l->at[i] < GF_SLOT_DATA_OFFSET || l->at[i] > l->hdr_len || l->hdr_len - l->at[i] < 8))
            return 0;
    switch (l->kind) {
    case GF_LANE_COPY:
        return l->buf && l->parts && l->lens && l->nparts <= 1000;
    case GF_LANE_GATHER:
        return l->parts && l->lens && l->nparts <= 1000 && (l->zeros || !l->pad);
    case GF_LANE_DIRECT:
        return l->tail && (l->data || !l->data_len);
    default:
        return 0;
    }
}

int gf_lane_write(struct gf_lane *l, uint64_t seq, uint32_t slot, uint64_t v0, uint64_t v1, int64_t deadline_ns) {
    if (!l || slot > 1 || !lane_shape_ok(l)) return -EINVAL;
    if (seq > (uint64_t)INT64_MAX) return GF_LANE_AGAIN; /* forged or worn out: the slot store decides */
    struct timespec now;
    if (clock_gettime(CLOCK_MONOTONIC, &now) != 0) return GF_LANE_AGAIN;
    /* live while now < deadline (Lease.check, whose clock, time.monotonic_ns, reads CLOCK_MONOTONIC) */
    if ((int64_t)now.tv_sec * 1000000000 + now.tv_nsec >= deadline_ns) return GF_LANE_AGAIN;
    struct gf_gate *g = l->gate;
    int rc;
    /* SYNC POINT: descriptor closed (as GF_GATED), lane stale and lane closed: gf_gate_shut,
     * gf_gate_bump and gf_lane_close take this mutex, so no write of a shut gate, a stale lane or
     * a closed one starts once they have returned. */
    pthread_mutex_lock(&g->mu);
    if (g->shut) {
        rc = -EBADF;
    } else if (l->closed || l->gen != g->gen) {
        rc = GF_LANE_AGAIN;
    } else {
        uint8_t *h = l->hdr;
        put_u64le(h + GF_SLOT_SEQ_AT, seq);
        put_u32le(h + GF_SLOT_SLOT_AT, slot);
        if (l->at[0]) put_u64le(h + l->at[0], v0);
        if (l->at[1]) put_u64le(h + l->at[1], v1);
        int64_t pos = l->pos[slot];
        if (l->kind == GF_LANE_COPY)
            rc = slot_write_copy(l->fd, pos, l->buf, l->nbytes, l->block, h, l->parts, l->lens, l->nparts, 0,
                                 l->block, l->dsync, &l->zeroed);
        else if (l->kind == GF_LANE_GATHER)
            rc = gf_slot_write_gather(l->fd, pos, h, l->parts, l->lens, l->nparts, l->zeros, l->pad, l->dsync);
        else
            rc = gf_slot_write_direct(l->fd, pos, h, l->hdr_len, l->block, l->data, l->data_len, l->tail, l->aio_ctx,
                                      l->chunk ? l->chunk : l->block, l->dsync);
    }
    pthread_mutex_unlock(&g->mu);
    return rc;
}

void gf_lane_point(struct gf_lane *l, uint64_t hdr_len, const uint8_t *data, uint64_t data_len, uint64_t chunk) {
    if (!l) return;
    struct gf_gate *g = l->gate;
    if (g) pthread_mutex_lock(&g->mu); /* waits for the lane's write in the gate, if any */
    l->hdr_len = hdr_len;
    l->data = data;
    l->data_len = data_len;
    l->chunk = chunk;
    if (g) pthread_mutex_unlock(&g->mu);
}

void gf_lane_close(struct gf_lane *l) {
    if (!l) return;
    struct gf_gate *g = l->gate;
    if (g) pthread_mutex_lock(&g->mu); /* waits for the lane's write in the gate, if any */
    l->closed = 1;
    if (g) pthread_mutex_unlock(&g->mu);
}
