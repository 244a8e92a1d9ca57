/*
 * gf_segment.h: descriptor of a shared-memory segment (the shm driver's region).
 *
 * A segment is one POSIX shm object: a 4096-byte header page, then the
 * region's payload (what the driver protocol calls offset 0).
 *
 *   0                   1                   2                   3
 *   0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
 *  +---------------------------------------------------------------+
 *  |                 magic "GFSEGMT1" (u64)                        |  0
 *  |                                                               |
 *  +-------------------------------+-------------------------------+
 *  |  layout_version (u32) LAST    |  header_size (u32) = 4096     |  8
 *  +-------------------------------+-------------------------------+
 *  |                 segment_size (u64): header + payload          | 16
 *  |                 payload_size (u64)                            | 24
 *  |                 lease_id (16 bytes, random)                   | 32
 *  |                                                               |
 *  |                 generation (u64)                              | 48
 *  |                 ttl_ns (u64)                                  | 56
 *  |                 created_ns (u64, CLOCK_MONOTONIC)             | 64
 *  |                 owner_pid (u64)                               | 72
 *  |                 clock_domain (u64): 0 = CLOCK_MONOTONIC       | 80
 *  |                 ... zero to 128 ...                           |
 *  +---------------------------------------------------------------+
 *  |  lease line (128 B): lease_state (u64)                        | 128
 *  |                      deadline_ns (u64, CLOCK_MONOTONIC)       | 136
 *  +---------------------------------------------------------------+
 *  |                 ... zero to 4096; payload follows ...         |
 *  +---------------------------------------------------------------+
 *
 * Who writes: the allocator builds the header in two phases: every field,
 * then layout_version with a release store (SYNC POINT: segment-ready). An
 * attacher loads layout_version with acquire: 0 means NOT_READY, another
 * value VERSION_MISMATCH, a wrong magic or a short segment CORRUPTED.
 * The lease line is written by whoever holds the lease (renew: deadline,
 * revoke/free: state) with release stores and read with acquire loads by
 * every data operation of every process (SYNC POINT: lease-state).
 *
 * clock_domain says which clock created_ns and deadline_ns are in: 0 is the
 * host-wide CLOCK_MONOTONIC (every process on the machine can judge the
 * lease); any other value names a private clock (a test's ManualClock) that
 * only the processes holding that clock can read, so a reaper elsewhere never
 * judges such a lease by its own time (drivers/shm.py, "Clock domains").
 * Written before layout_version, like every other field.
 */
#ifndef GF_SEGMENT_H
#define GF_SEGMENT_H

#include <stdint.h>
#include <stddef.h>

#define GF_SEG_MAGIC 0x31544d4745534647ull /* "GFSEGMT1" little-endian */
#define GF_SEG_LAYOUT_VERSION 1
#define GF_SEG_HEADER_SIZE 4096

#define GF_LEASE_BUILDING 0
#define GF_LEASE_ACTIVE 1
#define GF_LEASE_REVOKED 2
#define GF_LEASE_FREED 3

typedef struct gf_segment_header {
    uint64_t magic;
    uint32_t layout_version;
    uint32_t header_size;
    uint64_t segment_size;
    uint64_t payload_size;
    uint8_t lease_id[16];
    uint64_t generation;
    uint64_t ttl_ns;
    uint64_t created_ns;
    uint64_t owner_pid;
    uint64_t clock_domain;
    uint8_t _pad0[128 - 88];
    /* lease line */
    uint64_t lease_state;
    uint64_t deadline_ns;
    uint8_t _pad1[128 - 16];
    uint8_t _pad2[GF_SEG_HEADER_SIZE - 256];
} gf_segment_header;

_Static_assert(offsetof(gf_segment_header, layout_version) == 8, "segment layout");
_Static_assert(offsetof(gf_segment_header, lease_id) == 32, "segment layout");
_Static_assert(offsetof(gf_segment_header, generation) == 48, "segment layout");
_Static_assert(offsetof(gf_segment_header, owner_pid) == 72, "segment layout");
_Static_assert(offsetof(gf_segment_header, clock_domain) == 80, "segment layout");
_Static_assert(offsetof(gf_segment_header, lease_state) == 128, "segment layout");
_Static_assert(offsetof(gf_segment_header, deadline_ns) == 136, "segment layout");
_Static_assert(sizeof(gf_segment_header) == GF_SEG_HEADER_SIZE, "segment header is one page");

#endif /* GF_SEGMENT_H */
