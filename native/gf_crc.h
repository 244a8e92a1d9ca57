/* CRC32C (Castagnoli) for the slot store's write path: copy a record's data into
 * the aligned write buffer and checksum it in the same pass. */
#ifndef GF_CRC_H
#define GF_CRC_H

#include <stdint.h>

/* Copies src[0, len) to dst[0, len) and returns the CRC32C of those bytes,
 * continuing from crc (0 for a fresh checksum; pass a previous return value to
 * checksum a record given in pieces). The same value as the `crc32c` package's
 * crc32c(data, crc). dst and src must not overlap. Uses the SSE4.2 crc32
 * instruction on three interleaved streams where the CPU has it, a table
 * otherwise. Never reads or writes outside the two ranges, never allocates. */
uint32_t gf_crc32c_copy(uint8_t *dst, const uint8_t *src, uint64_t len, uint32_t crc);

/* The CRC32C of buf[0, len), continuing from crc (no copy). */
uint32_t gf_crc32c(const uint8_t *buf, uint64_t len, uint32_t crc);

#endif
