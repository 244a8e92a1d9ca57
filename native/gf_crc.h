/* CRC32C (Castagnoli) for the slot store's write path: copy a record's data into
 * the aligned write buffer and checksum it in the same pass. */
#ifndef GF_CRC_H
#define GF_CRC_H

#include <stdint.h>

/* Copies src[0, len) to dst[0, len) and returns the CRC32C of those bytes,
 * continuing from crc (0 for a fresh checksum; pass a previous return value to
 * checksum a record given in pieces). The same value as the `crc32c` package's
 * crc32c(data, crc). dst and src must not overlap. Folds 256 bytes a step with
 * VPCLMULQDQ on AVX-512 where the CPU has them, else uses the SSE4.2 crc32
 * instruction on three interleaved streams, else a table. Never reads or writes outside the two ranges, never allocates. */
uint32_t gf_crc32c_copy(uint8_t *dst, const uint8_t *src, uint64_t len, uint32_t crc);

/* The CRC32C of buf[0, len), continuing from crc (no copy). */
uint32_t gf_crc32c(const uint8_t *buf, uint64_t len, uint32_t crc);

/* Which code the two above run (chosen once, by the CPU): 2 folding with VPCLMULQDQ on AVX-512
 * registers for runs of 512 bytes or more (the crc32 instruction below that), 1 the SSE4.2 crc32
 * instruction on three streams, 0 a table. GRAFOS_CRC_NO_VPCLMUL in the environment (read once)
 * turns 2 into 1, to compare the two. */
int gf_crc32c_impl(void);

/* Slot records (grafos_fabric.slots): the 56 header bytes, zero to byte 64,
 * the data, zero to nbytes. */
#define GF_SLOT_DATA_OFFSET 64u
#define GF_SLOT_HEADER_FIELDS 56u
#define GF_SLOT_SEQ_AT 16u
#define GF_SLOT_DATA_CRC_AT 32u
#define GF_SLOT_SLOT_AT 36u
#define GF_SLOT_HEADER_CRC_AT 48u /* the header CRC covers bytes [0, 48) */
#define GF_SLOT_MAX_AIO 60u       /* requests one record is split into, at most */

/* A Linux native AIO context for gf_slot_write (*ctx set); 0 or -errno. */
int gf_aio_setup(uint32_t nr_events, uint64_t *ctx);
/* Destroys it (no request may be in flight: gf_slot_write never returns with one). */
int gf_aio_destroy(uint64_t ctx);

/* Builds one slot record in buf[0, nbytes) and writes it durably at byte pos of fd.
 * buf: page-aligned, nbytes a multiple of block, block a power of two >= 512;
 * header: the 56 header bytes with data_crc and header_crc zero; parts[i] of
 * lens[i] bytes: the data, 64 + sum(lens) <= nbytes (else -EINVAL, nothing
 * written). The data is copied into buf from byte 64 with its CRC32C computed in
 * the same pass, the tail zeroed, both CRCs put into the header. Then:
 *  - aio_ctx == 0 or nbytes <= chunk: one write of buf (pwritev2 with RWF_DSYNC
 *    when dsync, else pwrite + fdatasync), repeated on short writes;
 *  - otherwise the record goes out as it is built: each `chunk` bytes (a
 *    multiple of block) of blocks 1.. are submitted to aio_ctx as soon as they
 *    are copied, the first block (header) last, once the CRC is known; every
 *    request is reaped, then one fdatasync. Should AIO fail (a submit refused,
 *    a short or failed request), the whole record is written again the first
 *    way, and 1 is returned (the caller may stop using aio_ctx); 2 when, on top
 *    of that, the requests could not be reaped and aio_ctx was destroyed to end
 *    them (the caller must not use or destroy it again). A record too large for
 *    GF_SLOT_MAX_AIO requests of `chunk` bytes goes out in larger ones.
 * Returns 0 (or 1, see above) once the record is durable, -errno otherwise.
 * Never returns with a request in flight: buf may be reused at once. */
int gf_slot_write(int fd, int64_t pos, uint8_t *buf, uint64_t nbytes, uint64_t block, const uint8_t *header,
                  const uint8_t *const *parts, const uint64_t *lens, uint32_t nparts, uint64_t aio_ctx,
                  uint64_t chunk, int dsync);

/* The same record without building it: header as above; parts are checksummed
 * where they lie (no copy), the 64 bytes from the header (both CRCs put in, then
 * zeros) built on the stack, then those 64 bytes, the parts and `pad` zero bytes
 * (from zeros, which holds at least pad) go out in one gathered pwritev2 (RWF_DSYNC
 * when dsync, else write + fdatasync; short writes continued). nparts <= 1000.
 * 0 once durable, -errno otherwise (-EINVAL: bad arguments, nothing written). */
int gf_slot_write_gather(int fd, int64_t pos, const uint8_t *header, const uint8_t *const *parts,
                         const uint64_t *lens, uint32_t nparts, const uint8_t *zeros, uint64_t pad, int dsync);

/* A record whose data ends in the caller's own aligned buffer, written from there (no copy).
 * head[0, head_len): the record's first head_len bytes (a positive multiple of block): the 56 header
 * bytes (both CRCs zero), then from byte 64 the first head_len - 64 data bytes; writable (the CRCs
 * are put in, bytes 56-63 zeroed). data[0, data_len): the rest of the data. head, tail and (when
 * data_len >= block) data are block-aligned addresses; tail is `block` writable bytes. The data's
 * whole blocks are written from data itself, its last partial block (if any) from tail (copied
 * there, zero-filled); data CRC = CRC32C of head[64, head_len) then data[0, data_len).
 *  - aio_ctx != 0 and a whole block of data: those blocks are submitted first (requests of at
 *    most `chunk` bytes, a multiple of block; larger when more than GF_SLOT_MAX_AIO would be
 *    needed), the CRC computed while they are in flight, then the head submitted, all reaped,
 *    one fdatasync. Where the blocks make more than one request, the first one waits and goes
 *    with the head (one vectored request), and the tail with the last one; else the tail and
 *    the head go in requests of their own. On AIO failure the whole record is written again as
 *    below and 1 (2: aio_ctx destroyed too) is returned, as gf_slot_write does;
 *  - otherwise the CRC first, then one pwritev2 of head, data blocks and tail (RWF_DSYNC when
 *    dsync, else + fdatasync), short writes continued.
 * Returns 0 (or 1, 2) once the record is durable, -errno otherwise (-EINVAL: bad arguments,
 * nothing written). Never returns with a request in flight. The caller must not change data
 * until it returns: the bytes checksummed would not be the bytes written (the record would then
 * fail its CRC on read, never be taken for a good one). */
int gf_slot_write_direct(int fd, int64_t pos, uint8_t *head, uint64_t head_len, uint64_t block, const uint8_t *data,
                         uint64_t data_len, uint8_t *tail, uint64_t aio_ctx, uint64_t chunk, int dsync);

/* A gate for the three writes above, for callers that write outside their own lock (a record
 * lane, grafos_fabric.drivers.block): a write through the gate holds its mutex while it runs, and
 * once gf_gate_shut has returned (after waiting for the write in the gate, if any) every write
 * through it returns -EBADF without touching its descriptor, so the descriptor may then be closed.
 * gf_gate_new: NULL when out of memory. gf_gate_free: only once no thread can call through it
 * any more (NULL is ignored). */
void *gf_gate_new(void);
void gf_gate_shut(void *gate);
void gf_gate_free(void *gate);
/* gf_slot_write, gf_slot_write_gather and gf_slot_write_direct through a gate (the same
 * arguments after slot, the same results, -EBADF once the gate is shut, nothing written). When
 * hdr is not NULL (the 56 header bytes the call then writes), seq and slot are first stored into
 * its sequence and slot fields (little-endian), so a caller whose header changes only there and
 * in its data need not pack it. */
int gf_slot_write_gated(uint64_t seq, void *gate, uint8_t *hdr, uint32_t slot, int fd, int64_t pos, uint8_t *buf,
                        uint64_t nbytes, uint64_t block, const uint8_t *header, const uint8_t *const *parts, const uint64_t *lens, uint32_t nparts,
                        uint64_t aio_ctx, uint64_t chunk, int dsync);
int gf_slot_write_gather_gated(uint64_t seq, void *gate, uint8_t *hdr, uint32_t slot, int fd, int64_t pos,
                               const uint8_t *header, const uint8_t *const *parts, const uint64_t *lens, uint32_t nparts, const uint8_t *zeros, uint64_t pad, int dsync);
int gf_slot_write_direct_gated(uint64_t seq, void *gate, uint8_t *hdr, uint32_t slot, int fd, int64_t pos,
                               uint8_t *head, uint64_t head_len, uint64_t block, const uint8_t *data, uint64_t data_len, uint8_t *tail, uint64_t aio_ctx,
                               uint64_t chunk, int dsync);

/* A record lane's write, prepared once (grafos_fabric.drivers.block.RecordLane): every argument
 * of one of the three writes above for the lane's two slots, so that a write is one call with the
 * few values that change. Filled by the caller; gf_lane_write checks its shape on every call. */
#define GF_LANE_COPY 0u   /* gf_slot_write: the data copied into buf (nbytes) with its CRC, O_DIRECT */
#define GF_LANE_GATHER 1u /* gf_slot_write_gather: hdr, the parts and pad zeros in one pwritev2 */
#define GF_LANE_DIRECT 2u /* gf_slot_write_direct: hdr (a multiple of block), data from where it lies */
#define GF_LANE_AGAIN 3   /* gf_lane_write wrote nothing: the caller writes the careful way */
typedef struct gf_lane {
    void *gate;       /* the region's gate (gf_gate_new): the write runs inside it */
    uint8_t *hdr;     /* the record's first hdr_len bytes: 56 header bytes (CRCs zero), zeros, data */
    uint64_t hdr_len; /* >= 64 */
    uint64_t gen;     /* the gate's generation (gf_gate_gen) when the lane was made */
    uint32_t kind;    /* GF_LANE_* */
    uint32_t closed;  /* set by gf_lane_close */
    int64_t pos[2];   /* byte position of slot 0 and slot 1 */
    uint64_t at[2];   /* where in hdr gf_lane_write stores v0 and v1 (u64 LE); 0: not stored */
    int32_t fd;
    int32_t dsync;
    uint64_t block;
    uint8_t *buf;     /* COPY: the page-aligned record buffer of nbytes */
    uint64_t nbytes;
    const uint8_t *const *parts; /* COPY, GATHER: the data after the header (hdr + 64 first) */
    const uint64_t *lens;
    uint32_t nparts;
    const uint8_t *zeros; /* GATHER: pad zero bytes after the parts */
    uint64_t pad;
    const uint8_t *data; /* DIRECT: the data after hdr, and the tail block */
    uint64_t data_len;
    uint8_t *tail;
    /* DIRECT: an AIO context (0: one pwritev2) used only by writes inside the gate, which the
     * gate's mutex serializes (no other write may reap its completions), and its request size
     * (0: block) */
    uint64_t aio_ctx;
    uint64_t chunk;
    /* COPY: set by gf_lane_write once buf's bytes after the record's data are zero. Every write
     * of a lane copies the same lengths (lens is the lane's, made once), so nothing puts a nonzero
     * byte there afterwards and later writes skip that memset (0.5 us of a 4 KiB record's
     * ~4 KiB of zeros, the cache cold after the I/O wait). Zero in a new lane (ffi.new). */
    uint32_t zeroed;
} gf_lane;
/* The gate's generation, and its increment (after the mutex: a write in the gate ends first). */
uint64_t gf_gate_gen(void *gate);
void gf_gate_bump(void *gate);
/* One record through the lane at slot (0 or 1): stores seq and slot into hdr's header, v0 and v1
 * at at[0], at[1], then makes the lane's write for that slot inside the gate. GF_LANE_AGAIN,
 * having written nothing, when the lane is closed or its generation is not the gate's, when
 * CLOCK_MONOTONIC has reached deadline_ns (the lease's), or seq > INT64_MAX; -EBADF once the gate
 * is shut; -EINVAL when the lane's fields do not describe a write; else the write's result. */
int gf_lane_write(struct gf_lane *lane, uint64_t seq, uint32_t slot, uint64_t v0, uint64_t v1, int64_t deadline_ns);
/* Points a DIRECT lane at other data (after a write in its gate ends): its hdr_len, data,
 * data_len and chunk, together, so that no write sees a mix of the old and the new. */
void gf_lane_point(struct gf_lane *lane, uint64_t hdr_len, const uint8_t *data, uint64_t data_len, uint64_t chunk);
/* Marks the lane closed (after a write in its gate ends); later writes return GF_LANE_AGAIN. */
void gf_lane_close(struct gf_lane *lane);

#endif
