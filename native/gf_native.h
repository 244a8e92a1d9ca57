/*
 * gf_native.h: the C API that grafos_fabric._native exposes through cffi.
 * Layouts live in their descriptors (gf_segment.h, gf_ring.h); atomics in
 * gf_atomics.h. Every function validates what it reads from shared memory
 * and returns a status code instead of trusting it: nothing a peer writes
 * into a segment can make this code read or write outside the mapping.
 */
#ifndef GF_NATIVE_H
#define GF_NATIVE_H

#include <stdint.h>
#include "gf_atomics.h"
#include "gf_segment.h"
#include "gf_ring.h"

/* Bumped whenever a layout or this API changes; the Python wrapper refuses a
 * build whose number differs from the one it was written for. */
#define GF_NATIVE_ABI 11

/* Status codes. 0 and the small positive values are ordinary outcomes;
 * negatives are errors (the grafOS ones first). */
#define GF_OK 0
#define GF_FULL 1
#define GF_EMPTY 1
#define GF_END 2            /* sealed and drained: nothing will ever come */
#define GF_E_DISCONNECTED -1
#define GF_E_EXPIRED -2
#define GF_E_FENCED -3      /* epoch superseded at the target */
#define GF_E_CAPACITY -4
#define GF_E_UNSUPPORTED -5
#define GF_E_REVOKED -6
#define GF_E_SEALED -10
#define GF_E_ROLE -11       /* another producer/consumer holds the role */
#define GF_E_TOO_LARGE -12
#define GF_E_CORRUPT -13
#define GF_E_NOT_READY -14
#define GF_E_VERSION -15
#define GF_E_HELD -16       /* too many unreleased items */
#define GF_E_CLAIMED -17    /* a reservation is outstanding */
#define GF_E_ARG -18

typedef struct gf_producer {
    gf_ring_header *hdr;
    uint8_t *data;
    volatile uint64_t *lease_state;
    volatile uint64_t *lease_deadline;
    uint64_t capacity;
    uint64_t mask;
    uint64_t max_item;
    uint64_t tail;        /* published position */
    uint64_t claim;       /* end of written, unpublished records */
    uint64_t head_cache;
    uint64_t next_seq;
    uint64_t pub_seq;     /* next_seq at the last publish */
    uint64_t tag;         /* epoch tag, in place in the tail word */
    uint64_t epoch;
    uint64_t id;
    uint64_t publish_every; /* publish a batch in chunks of this many bytes */
    uint64_t reserved_at;   /* record position of an outstanding reservation */
    uint64_t reserved_len;
    uint64_t reserved_seq;  /* its sequence number (kept here, not read back from the ring) */
    int reserved;
    int lock;             /* cffi drops the GIL: two threads must not run one producer at once */
} gf_producer;

typedef struct gf_consumer {
    gf_ring_header *hdr;
    uint8_t *data;
    volatile uint64_t *lease_state;
    volatile uint64_t *lease_deadline;
    uint64_t capacity;
    uint64_t mask;
    uint64_t max_item;
    uint64_t rpos;        /* next record to read */
    uint64_t tail_cache;  /* published position last seen */
    uint64_t head;        /* head last stored */
    uint64_t *pend_end;   /* end position of each outstanding token */
    uint8_t *pend_done;
    uint64_t pend_mask;
    uint64_t pend_first;  /* outstanding tokens: [pend_first, pend_next) */
    uint64_t pend_next;
    uint64_t id;
    uint64_t last_seq;    /* sequence number of the last record popped (if have_seq) */
    int have_seq;
    int lock;             /* pops, releases from finalizers in other threads: serialized */
} gf_consumer;

int gf_native_abi(void);

/* segments */
int gf_segment_init(void *seg, uint64_t segment_size, const uint8_t *lease_id, uint64_t generation,
                    uint64_t ttl_ns, uint64_t created_ns, uint64_t deadline_ns, uint64_t pid);
int gf_segment_check(const void *seg, uint64_t mapped_size);

/* generic atomics at a byte offset of a mapping (the shm one-sided ops) */
uint64_t gf_load_acquire_at(void *base, uint64_t off);
void gf_store_release_at(void *base, uint64_t off, uint64_t value);
uint64_t gf_cas_at(void *base, uint64_t off, uint64_t expected, uint64_t desired);
uint64_t gf_faa_at(void *base, uint64_t off, uint64_t add);

/* rings */
uint64_t gf_record_size(uint64_t length);
int gf_ring_init(void *ring, uint64_t region_size, uint64_t capacity, uint64_t max_item, uint64_t first_seq,
                 uint64_t epoch, const char *dtype, uint32_t dtype_len, uint32_t flags);
int gf_ring_check(const void *ring, uint64_t region_size);
int gf_ring_seal(void *ring, uint64_t seal_seq);
int gf_ring_advance_epoch(void *ring, uint64_t new_epoch);

/* Role init validates the ring's geometry against region_size (the bytes
 * mapped at `ring`), and the positions it starts from. */
int gf_producer_init(gf_producer *p, void *ring, uint64_t region_size, volatile uint64_t *lease_state,
                     volatile uint64_t *lease_deadline, uint64_t epoch, uint64_t id);
int gf_producer_close(gf_producer *p);
int gf_push(gf_producer *p, const void *buf, uint64_t len, uint64_t now_ns, uint64_t *seq_out);
int gf_push_rows(gf_producer *p, const void *base, uint64_t n, uint64_t row_stride, uint64_t len, uint64_t now_ns,
                 uint64_t *pushed);
int gf_push_concat(gf_producer *p, const void *base, const uint64_t *lens, uint64_t n, uint64_t now_ns,
                   uint64_t *pushed);
int gf_reserve(gf_producer *p, uint64_t len, uint64_t now_ns, uint64_t *payload_off);
int gf_commit(gf_producer *p, uint64_t len, uint64_t *seq_out);
int gf_abort(gf_producer *p);
int gf_wait_space(gf_producer *p, uint64_t len, uint64_t timeout_ns, uint32_t spin);

int gf_consumer_init(gf_consumer *c, void *ring, uint64_t region_size, volatile uint64_t *lease_state,
                     volatile uint64_t *lease_deadline, uint64_t id, uint64_t *pend_end, uint8_t *pend_done,
                     uint64_t pend_cap);
int gf_consumer_close(gf_consumer *c);
int gf_pop_batch(gf_consumer *c, uint64_t max_items, uint64_t max_bytes, int per_item, uint64_t now_ns,
                 uint64_t *offs, uint64_t *lens, uint64_t *seqs, uint64_t *n_out, uint64_t *token_out,
                 uint64_t *uniform_len);
int gf_release(gf_consumer *c, uint64_t token);
int gf_wait_data(gf_consumer *c, uint64_t timeout_ns, uint32_t spin);
uint64_t gf_consumer_outstanding(gf_consumer *c);

/* reserved rows (reserve_batch): up to n contiguous records of payload len,
 * published together (the first k of them) by gf_commit_rows; gf_abort drops them */
int gf_reserve_rows(gf_producer *p, uint64_t n, uint64_t len, uint64_t now_ns, uint64_t *payload_off, uint64_t *got);
int gf_commit_rows(gf_producer *p, uint64_t k, uint64_t *first_seq);

#endif /* GF_NATIVE_H */
