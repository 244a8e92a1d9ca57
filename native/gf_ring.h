/*
 * gf_ring.h: descriptor of the SPSC byte ring (FabricQueue) and its records.
 *
 * A ring lives at offset 0 of a region's payload: a 4096-byte ring header,
 * then `capacity` bytes of data (a power of two). Offsets, never pointers,
 * are stored, so the same bytes work at any mapping address and as an RDMA
 * memory region.
 *
 * Ring header:
 *   0                   1                   2                   3
 *   0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
 *  +-------------------------------+-------------------------------+
 *  |  magic "GFRQ" (u32)           |  version (u32) written LAST   |    0
 *  +-------------------------------+-------------------------------+
 *  |  capacity (u64): data bytes, power of two                     |    8
 *  |  max_item (u64): largest payload                              |   16
 *  |  first_seq (u64): sequence number of the first item           |   24
 *  |  created_epoch (u64)                                          |   32
 *  +-------------------------------+-------------------------------+
 *  |  flags (u32)                  |  dtype_len (u32)              |   40
 *  +-------------------------------+-------------------------------+
 *  |  dtype (80 bytes, ASCII numpy dtype.str; dtype_len used)      |   48
 *  +---------------------------------------------------------------+
 *  |  control line: epoch (u64) | seal_seq (u64)                   |  128
 *  |                producer_id (u64) | consumer_id (u64)          |
 *  |                onesided_peers (u64)                           |  160
 *  +---------------------------------------------------------------+
 *  |  tail line:  tail word (u64) | next_seq (u64)                 |  256
 *  +---------------------------------------------------------------+
 *  |  head line:  head (u64)                                       |  384
 *  +---------------------------------------------------------------+
 *  |  acked line: acked (u64)                                      |  512
 *  +-------------------------------+-------------------------------+
 *  |  data_futex (u32)             |  zero (u32)                   |  640
 *  |  data_waiters (u64): sleeping consumers                       |  648
 *  +-------------------------------+-------------------------------+
 *  |  space_futex (u32)            |  zero (u32)                   |  768
 *  |  space_waiters (u64): sleeping producers (one-sided: faa64)   |  776
 *  |  space_want (u64): head a sleeping producer waits for         |  784
 *  +---------------------------------------------------------------+
 *  |  reserved to 4096; data area follows                          |
 *  +---------------------------------------------------------------+
 *
 * Tail word (one u64, so publish and fencing are one compare-and-swap):
 *   bit 63      SEALED: no record past this position will ever be read
 *   bits 62..56 epoch tag: low 7 bits of the epoch the producer holds
 *   bits 55..0  position: byte counter, only grows; index = position & mask
 *
 * Record (16-byte header, records aligned to 16 bytes, payload at +16):
 *   0                   1                   2                   3
 *  +-------------------------------+-------------------------------+
 *  |  length (u32): payload bytes  |  type (u32): 1 DATA, 2 PADDING |
 *  +-------------------------------+-------------------------------+
 *  |  seq (u64): edge sequence number                              |
 *  +---------------------------------------------------------------+
 *  |  payload (length bytes), zero padding to a multiple of 16     |
 *  +---------------------------------------------------------------+
 * A PADDING record fills the gap at the wrap point so that every payload is
 * contiguous; its length is the gap minus the header.
 *
 * Alignment: every 64-bit word is 8-byte aligned (C atomics and RDMA atomics
 * both need it; the futex words are u32, each with its own u64 waiter
 * count). Every position (tail, head, a record's start) is a multiple of
 * GF_RECORD_ALIGN: a position that is not is corrupt, never used.
 *
 * Trust: any process that can write the segment can write any of these
 * bytes. Readers load each shared word once into a local, check it (range
 * AND alignment, against the geometry cached and validated at role init),
 * and only then use it; what fails a check is GF_E_CORRUPT, never an access
 * outside the mapping.
 *
 * Who writes what: the producer (one, holding producer_id and the epoch)
 * writes records past the published tail, then publishes them all with one
 * CAS of the tail word whose expected value carries its epoch tag and no
 * SEALED bit (SYNC POINT: ring-publish). A producer whose epoch was
 * superseded, or a sealed ring, fails that CAS: it is fenced at the target.
 * The consumer (one, holding consumer_id) loads the tail word with acquire
 * (SYNC POINT: ring-publish), reads records up to its position, and frees
 * space by storing head (SYNC POINT: ring-release), which the producer reads
 * with acquire only when its head cache says there is no room. Blocking uses
 * the futex words: a sleeper bumps *_waiters, then the futex word (it sleeps
 * on the value it made), re-checks, then waits. The other side, after its
 * full-fence store, sees *_waiters and compares the futex word with the value
 * its own last wake left there: only when they differ (someone went to sleep
 * since) does it bump the word and wake. So a sleeper costs the other side
 * one wake syscall, however many items are published (or released) before
 * it runs again; the bumps are seq_cst read-modify-writes on both sides, so
 * a sleeper that re-checked before the other side's store is always seen.
 * A producer sleeping for space asks for a quarter of the ring (space_want),
 * so a consumer that is the bottleneck pays one wake per quarter ring, not
 * one per item. A one-sided peer (RDMA) cannot wake a futex: it counts itself
 * in onesided_peers, and mapped sleepers then wait in short slices.
 */
#ifndef GF_RING_H
#define GF_RING_H

#include <stdint.h>
#include <stddef.h>

#define GF_RING_MAGIC 0x51524647u /* "GFRQ" */
#define GF_RING_LAYOUT_VERSION 3 /* 2: waiter counts are u64 at 8-aligned offsets; 3: sleepers bump the futex word */
#define GF_RING_HEADER_SIZE 4096
#define GF_RING_MIN_CAPACITY 4096ull
#define GF_RING_MAX_CAPACITY (1ull << 40)
#define GF_RECORD_HEADER_SIZE 16
#define GF_RECORD_ALIGN 16
#define GF_RECORD_DATA 1
#define GF_RECORD_PADDING 2
#define GF_DTYPE_MAX 80
#define GF_POS_MISALIGNED(pos) ((pos) & (uint64_t)(GF_RECORD_ALIGN - 1))

#define GF_TAIL_SEALED (1ull << 63)
#define GF_TAIL_TAG_SHIFT 56
#define GF_TAIL_TAG_MASK (0x7full << GF_TAIL_TAG_SHIFT)
#define GF_TAIL_POS_MASK ((1ull << GF_TAIL_TAG_SHIFT) - 1)

typedef struct gf_ring_header {
    uint32_t magic;
    uint32_t version;
    uint64_t capacity;
    uint64_t max_item;
    uint64_t first_seq;
    uint64_t created_epoch;
    uint32_t flags;
    uint32_t dtype_len;
    char dtype[GF_DTYPE_MAX];
    /* control line */
    uint64_t epoch;
    uint64_t seal_seq;
    uint64_t producer_id;
    uint64_t consumer_id;
    uint64_t onesided_peers; /* handles reaching this ring one-sided (they cannot wake a futex) */
    uint8_t _pad1[128 - 40];
    /* tail line */
    uint64_t tail;
    uint64_t next_seq;
    uint8_t _pad2[128 - 16];
    /* head line */
    uint64_t head;
    uint8_t _pad3[128 - 8];
    /* acked line */
    uint64_t acked;
    uint8_t _pad4[128 - 8];
    /* waiter lines */
    uint32_t data_futex;
    uint32_t _zero5;
    uint64_t data_waiters;
    uint8_t _pad5[128 - 16];
    uint32_t space_futex;
    uint32_t _zero6;
    uint64_t space_waiters;
    uint64_t space_want;  /* head position a sleeping producer waits for */
    uint8_t _pad6[128 - 24];
    uint8_t _pad7[GF_RING_HEADER_SIZE - 896];
} gf_ring_header;

_Static_assert(offsetof(gf_ring_header, version) == 4, "ring layout");
_Static_assert(offsetof(gf_ring_header, capacity) == 8, "ring layout");
_Static_assert(offsetof(gf_ring_header, first_seq) == 24, "ring layout");
_Static_assert(offsetof(gf_ring_header, flags) == 40, "ring layout");
_Static_assert(offsetof(gf_ring_header, dtype) == 48, "ring layout");
_Static_assert(offsetof(gf_ring_header, epoch) == 128, "ring layout");
_Static_assert(offsetof(gf_ring_header, seal_seq) == 136, "ring layout");
_Static_assert(offsetof(gf_ring_header, producer_id) == 144, "ring layout");
_Static_assert(offsetof(gf_ring_header, consumer_id) == 152, "ring layout");
_Static_assert(offsetof(gf_ring_header, onesided_peers) == 160, "ring layout");
_Static_assert(offsetof(gf_ring_header, tail) == 256, "ring layout");
_Static_assert(offsetof(gf_ring_header, next_seq) == 264, "ring layout");
_Static_assert(offsetof(gf_ring_header, head) == 384, "ring layout");
_Static_assert(offsetof(gf_ring_header, acked) == 512, "ring layout");
_Static_assert(offsetof(gf_ring_header, data_futex) == 640, "ring layout");
_Static_assert(offsetof(gf_ring_header, data_waiters) == 648, "ring layout");
_Static_assert(offsetof(gf_ring_header, space_futex) == 768, "ring layout");
_Static_assert(offsetof(gf_ring_header, space_waiters) == 776, "ring layout");
_Static_assert(offsetof(gf_ring_header, space_want) == 784, "ring layout");
/* every 64-bit word that is ever accessed atomically is 8-byte aligned */
#define GF_ALIGNED8(f) _Static_assert(offsetof(gf_ring_header, f) % 8 == 0, "8-byte aligned: " #f)
GF_ALIGNED8(capacity); GF_ALIGNED8(max_item); GF_ALIGNED8(first_seq); GF_ALIGNED8(created_epoch);
GF_ALIGNED8(epoch); GF_ALIGNED8(seal_seq); GF_ALIGNED8(producer_id); GF_ALIGNED8(consumer_id);
GF_ALIGNED8(onesided_peers); GF_ALIGNED8(tail); GF_ALIGNED8(next_seq); GF_ALIGNED8(head); GF_ALIGNED8(acked);
GF_ALIGNED8(data_waiters); GF_ALIGNED8(space_waiters); GF_ALIGNED8(space_want);
#undef GF_ALIGNED8
_Static_assert(sizeof(gf_ring_header) == GF_RING_HEADER_SIZE, "ring header is one page");

typedef struct gf_record_header {
    uint32_t length;
    uint32_t type;
    uint64_t seq;
} gf_record_header;

_Static_assert(sizeof(gf_record_header) == GF_RECORD_HEADER_SIZE, "record header");
_Static_assert(offsetof(gf_record_header, seq) == 8, "record header");

#endif /* GF_RING_H */
