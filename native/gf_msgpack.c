/* gf_msgpack_depth: see gf_msgpack.h. The msgpack format: https://github.com/msgpack/msgpack/blob/master/spec.md */
#include "gf_msgpack.h"

static uint64_t be(const uint8_t *p, unsigned n) {
    uint64_t v = 0;
    for (unsigned i = 0; i < n; i++) v = (v << 8) | p[i];
    return v;
}

int64_t gf_msgpack_depth(const uint8_t *buf, uint64_t len, uint32_t max_depth) {
    uint64_t left[GF_MSGPACK_MAX_DEPTH + 1]; /* items still to read at each open level */
    uint32_t depth = 0, deepest = 0;
    uint64_t pos = 0;
    if (max_depth > GF_MSGPACK_MAX_DEPTH) max_depth = GF_MSGPACK_MAX_DEPTH;
    left[0] = 1; /* the top-level value */
    while (1) {
        uint64_t skip = 0, items = 0; /* bytes after the type byte (and its length field); container items */
        unsigned lenbytes = 0;        /* size of a length field that follows the type byte */
        int container = 0;
        if (pos >= len) return GF_MSGPACK_MALFORMED;
        uint8_t b = buf[pos++];
        if (b <= 0x7f || b >= 0xe0 || b == 0xc0 || b == 0xc2 || b == 0xc3) {
            /* fixint, nil, bool */
        } else if (b <= 0x8f) {
            container = 1, items = 2 * (uint64_t)(b & 0x0f);
        } else if (b <= 0x9f) {
            container = 1, items = b & 0x0f;
        } else if (b <= 0xbf) {
            skip = b & 0x1f;
        } else {
            switch (b) {
            case 0xc4: case 0xd9: lenbytes = 1; break;          /* bin8, str8 */
            case 0xc5: case 0xda: lenbytes = 2; break;          /* bin16, str16 */
            case 0xc6: case 0xdb: lenbytes = 4; break;          /* bin32, str32 */
            case 0xc7: lenbytes = 1, skip = 1; break;           /* ext8: length, type, data */
            case 0xc8: lenbytes = 2, skip = 1; break;
            case 0xc9: lenbytes = 4, skip = 1; break;
            case 0xca: skip = 4; break;                         /* float32 */
            case 0xcb: skip = 8; break;                         /* float64 */
            case 0xcc: case 0xd0: skip = 1; break;
            case 0xcd: case 0xd1: skip = 2; break;
            case 0xce: case 0xd2: skip = 4; break;
            case 0xcf: case 0xd3: skip = 8; break;
            case 0xd4: skip = 2; break;                         /* fixext 1, 2, 4, 8, 16 (+ type byte) */
            case 0xd5: skip = 3; break;
            case 0xd6: skip = 5; break;
            case 0xd7: skip = 9; break;
            case 0xd8: skip = 17; break;
            case 0xdc: container = 1, lenbytes = 2; break;      /* array16 */
            case 0xdd: container = 1, lenbytes = 4; break;      /* array32 */
            case 0xde: container = 2, lenbytes = 2; break;      /* map16 */
            case 0xdf: container = 2, lenbytes = 4; break;      /* map32 */
            default: return GF_MSGPACK_MALFORMED;               /* 0xc1: never used */
            }
        }
        if (lenbytes) {
            if (len - pos < lenbytes) return GF_MSGPACK_MALFORMED;
            uint64_t n = be(buf + pos, lenbytes);
            pos += lenbytes;
            if (container) items = n * (uint64_t)container;
            else skip += n;
        }
        if (skip) {
            if (len - pos < skip) return GF_MSGPACK_MALFORMED;
            pos += skip;
        }
        left[depth]--; /* this value is read (a container's items follow) */
        if (container) {
            if (depth + 1 > max_depth) return GF_MSGPACK_TOO_DEEP;
            if (depth + 1 > deepest) deepest = depth + 1;
            if (items) {
                /* every item takes at least one byte: a count past the bytes left is a lie */
                if (items > len - pos) return GF_MSGPACK_MALFORMED;
                left[++depth] = items;
                continue;
            }
        }
        while (left[depth] == 0) {
            if (depth == 0) return pos == len ? (int64_t)deepest : GF_MSGPACK_MALFORMED;
            depth--;
        }
    }
}
