/* gf_crc32c_copy / gf_crc32c: see gf_crc.h.
 *
 * CRC32C register arithmetic: the reflected polynomial 0x82F63B78, register
 * preset to ~crc and inverted at the end, so results chain like zlib's crc32.
 * The hardware path runs three independent crc32q chains over three adjacent
 * stretches of STRETCH bytes (the instruction has a latency of three cycles
 * and a throughput of one), copying each 8-byte word as it is consumed, then
 * joins the three registers: feeding a register STRETCH zero bytes is a linear
 * map over GF(2), tabulated once (four tables of 256 entries, one per byte of
 * the register) from its action on the 32 one-bit registers. */
#include "gf_crc.h"

#include <pthread.h>
#include <stdint.h>
#include <string.h>

#define POLY 0x82F63B78u
#define STRETCH 2048u /* bytes per chain per round: 3 * 2048 = 6 KiB a round */

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

static void init_tables(void) {
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++) c = c & 1 ? (c >> 1) ^ POLY : c >> 1;
        byte_table[i] = c;
    }
#if defined(__x86_64__)
    __builtin_cpu_init();
    have_hw = __builtin_cpu_supports("sse4.2");
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
    if (have_hw) return ~hw_run(dst, src, len, reg);
#endif
    return ~(dst ? sw_copy(dst, src, len, reg) : sw_update(reg, src, len));
}

uint32_t gf_crc32c(const uint8_t *buf, uint64_t len, uint32_t crc) { return gf_crc32c_copy(NULL, buf, len, crc); }
