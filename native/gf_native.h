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
#define GF_NATIVE_ABI 14

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

/* Outcomes of the ring core's pure functions (gf_ring_core.h), which do no
 * I/O: they tell the caller which word or bytes to bring next. */
#define GF_PADDING 3        /* the next record is the padding at the wrap (a batch stops there) */
#define GF_TAIL 4           /* the reader reached its tail cache: load the tail word */
#define GF_READ 5           /* the image lacks bytes the next record needs: read them */
#define GF_LOST 6           /* the tail word is not this producer's: gf_ring_lost_tail says why */
#define GF_DONE 7           /* a CAS loop's step: the word already says it, nothing to store */
#define GF_CLAIM_CAS 8      /* take the role with a CAS of its id word from 0 */
#define GF_CLAIM_TAKEOVER 9 /* a newer epoch: advance the epoch, then store the id (the holder is gone) */
#define GF_CLAIM_SEAL 10    /* a newer epoch found a live or unprovable holder: fence and seal instead */

/* What the region's role lock said to a claimant (gf_ring_claim_verdict). */
#define GF_LOCK_NONE 0      /* the region has no role locks */
#define GF_LOCK_BUSY 1      /* a live holder has the lock */
#define GF_LOCK_HELD 2      /* the claimant has it */

/* A role id whose holder keeps the region's role lock while it holds the role
 * (so its death is provable: the lock is free); the other bits are the
 * holder's (grafos_fabric.queue._roles). */
#define GF_ROLE_LOCKED (1ull << 63)

/* A producer starts only below this next sequence number: its u64 sequence
 * numbers must not wrap within 2**40 items (more than any real count). */
#define GF_SEQ_LIMIT (~0ull - (1ull << 40))

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
    uint32_t data_woke;   /* data_futex as this producer's last wake left it (see gf_ring.h, Waiting) */
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
    uint32_t space_woke;  /* space_futex as this consumer's last wake left it (see gf_ring.h, Waiting) */
} gf_consumer;

/* The functions: one prototype-only header, shared with the cffi build
 * (native/build_native.py passes it to ffi.cdef as it is). */
#include "gf_native_api.h"

#endif /* GF_NATIVE_H */
