/* Bounds on untrusted msgpack bytes before a decoder sees them (checkpoint states). */
#ifndef GF_MSGPACK_H
#define GF_MSGPACK_H

#include <stdint.h>

#define GF_MSGPACK_MAX_DEPTH 1024 /* the largest max_depth gf_msgpack_depth accepts */
#define GF_MSGPACK_MALFORMED (-1) /* truncated, trailing bytes, or the unused type byte 0xc1 */
#define GF_MSGPACK_TOO_DEEP (-2)  /* containers nest deeper than max_depth */

/* The nesting depth of the one msgpack value that fills buf[0, len): 0 for a
 * scalar, 1 for a flat array or map, and so on. Iterative (a fixed stack of
 * remaining-item counters), never reads outside [buf, buf + len), never
 * allocates. Returns GF_MSGPACK_MALFORMED or GF_MSGPACK_TOO_DEEP (negative)
 * when the bytes are not exactly one value or nest deeper than max_depth
 * (clamped to GF_MSGPACK_MAX_DEPTH). */
int64_t gf_msgpack_depth(const uint8_t *buf, uint64_t len, uint32_t max_depth);

#endif
