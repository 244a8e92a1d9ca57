/*
 * gf_ring_core.h: the ring protocol's decisions, once, as pure functions.
 *
 * Every decision of the SPSC ring (gf_ring.h) that both access paths make
 * lives here: build a ring header, validate the geometry, start a role from
 * the words it read, decide whether a tail word is still this producer's and
 * why not, validate a head, place a record (padding at the wrap), the
 * arguments and outcome of the publish CAS, validate a tail, parse and
 * validate the records a consumer reads. Nothing here does I/O: no atomics,
 * no futexes, no loads of shared words. The callers bring the words:
 *
 *   - the mapped path (gf_native.c) loads them from the mapping with the
 *     atomics of gf_atomics.h, and passes the mapped data area as the image;
 *   - the one-sided path (grafos_fabric/queue/_onesided*.py) loads them with the
 *     region's load64/cas64/read_into, and passes local buffers laid out like
 *     the ring (a staging image the producer frames into and then WRITEs, a
 *     mirror the consumer READs into), through the exported gf_ring_*
 *     functions (gf_native_api.h).
 *
 * The state structs are gf_producer / gf_consumer (gf_native.h); the core
 * reads and writes only their position fields (capacity, mask, max_item,
 * tail, claim, head_cache, next_seq, pub_seq, tag, epoch, publish_every,
 * reserved*; rpos, tail_cache, head, last_seq, have_seq, the release-token
 * ring pend_*), never hdr/data/lease/lock,
 * so a one-sided handle uses the same structs with those left NULL.
 *
 * Taking a role and the header's CAS loops (seal, advance the epoch, acked)
 * are decided here too, one step at a time: given the word the caller loaded
 * (or a CAS returned), what to do or store next. The caller runs the loop and
 * bounds it (a word that keeps changing is GF_E_CORRUPT).
 *
 * A word that comes from shared memory is untrusted: each function that
 * takes one checks range and alignment before anything is derived from it,
 * and answers GF_E_CORRUPT for what a producer following the protocol
 * cannot have written.
 */
#ifndef GF_RING_CORE_H
#define GF_RING_CORE_H

#include <stdint.h>
#include <string.h>
#include "gf_native.h"

static inline uint64_t gf_rc_record_size(uint64_t len) {
    return (GF_RECORD_HEADER_SIZE + len + GF_RECORD_ALIGN - 1) & ~(uint64_t)(GF_RECORD_ALIGN - 1);
}

static inline int gf_rc_is_pow2(uint64_t v) { return v && !(v & (v - 1)); }

static inline uint64_t gf_rc_tag(uint64_t epoch) { return (epoch << GF_TAIL_TAG_SHIFT) & GF_TAIL_TAG_MASK; }

/* ------------------------------------------------------------- geometry */

/* A ring's capacity and max_item, each read once, against the bytes the
 * caller can reach at the ring (region_size): a capacity that is a power of
 * two in range and fits the region, a max_item that fits half of it (checked
 * before the record size, which would wrap for a huge value). */
static inline int gf_rc_geometry(uint64_t cap, uint64_t max_item, uint64_t region_size) {
    if (region_size < GF_RING_HEADER_SIZE) return GF_E_CORRUPT;
    if (!gf_rc_is_pow2(cap) || cap < GF_RING_MIN_CAPACITY || cap > GF_RING_MAX_CAPACITY ||
        region_size - GF_RING_HEADER_SIZE < cap)
        return GF_E_CORRUPT;
    if (max_item == 0 || max_item > cap / 2 || gf_rc_record_size(max_item) > cap / 2) return GF_E_CORRUPT;
    return GF_OK;
}

/* Build a ring header image: every field but the version word, which the
 * caller stores last with release (SYNC POINT: ring-ready). */
static inline int gf_rc_build(gf_ring_header *h, uint64_t region_size, uint64_t capacity, uint64_t max_item,
                              uint64_t first_seq, uint64_t epoch, const char *dtype, uint32_t dtype_len,
                              uint32_t flags) {
    if (!gf_rc_is_pow2(capacity) || capacity < GF_RING_MIN_CAPACITY || capacity > GF_RING_MAX_CAPACITY)
        return GF_E_ARG;
    if (region_size < GF_RING_HEADER_SIZE || region_size - GF_RING_HEADER_SIZE < capacity) return GF_E_CAPACITY;
    if (max_item == 0 || max_item > capacity / 2 || gf_rc_record_size(max_item) > capacity / 2) return GF_E_ARG;
    if (dtype_len > GF_DTYPE_MAX) return GF_E_ARG;
    memset(h, 0, sizeof(*h));
    h->magic = GF_RING_MAGIC;
    h->capacity = capacity;
    h->max_item = max_item;
    h->first_seq = first_seq;
    h->created_epoch = epoch;
    h->flags = flags;
    h->dtype_len = dtype_len;
    if (dtype_len) memcpy(h->dtype, dtype, dtype_len);
    h->epoch = epoch;
    h->tail = gf_rc_tag(epoch);
    h->next_seq = first_seq;
    h->acked = first_seq;
    return GF_OK;
}

/* ------------------------------------------------- roles, seal, epoch, acked */

/* May a producer stamped `epoch` take the role, given the queue's epoch as
 * loaded (`epoch_now`), the producer id word as loaded (`holder`) and what
 * the region's role lock said (`lock`: GF_LOCK_NONE / _BUSY / _HELD)?
 *   GF_E_FENCED        older than the queue;
 *   GF_CLAIM_SEAL      newer, and the role is held by someone whose death is
 *                      not proven (no lock held here, or an id without
 *                      GF_ROLE_LOCKED): it may be mid-copy, so fence it and
 *                      seal the queue instead of writing where it writes;
 *   GF_E_ROLE          a live holder has the role lock;
 *   GF_CLAIM_TAKEOVER  newer: advance the epoch, then store the id;
 *   GF_CLAIM_CAS       the same epoch: CAS the id word from 0.
 * A caller that knows no holder and no lock (the mapped C init, after the
 * Python side decided) passes 0 and GF_LOCK_NONE. */
static inline int gf_rc_claim_verdict(uint64_t epoch, uint64_t epoch_now, uint64_t holder, int lock) {
    if (epoch < epoch_now) return GF_E_FENCED;
    if (epoch > epoch_now && holder != 0 && !(lock == GF_LOCK_HELD && (holder & GF_ROLE_LOCKED)))
        return GF_CLAIM_SEAL;
    if (lock == GF_LOCK_BUSY) return GF_E_ROLE;
    return epoch > epoch_now ? GF_CLAIM_TAKEOVER : GF_CLAIM_CAS;
}

/* The id word a claiming CAS (0 -> id) found: the role is ours, or another's. */
static inline int gf_rc_claimed(uint64_t found, uint64_t id) { return found == 0 || found == id ? GF_OK : GF_E_ROLE; }

/* A holder id that can be reclaimed by a caller that holds the role's lock:
 * one whose holder keeps that lock while it holds the role (so it is gone). */
static inline int gf_rc_reclaimable(uint64_t holder) { return holder != 0 && (holder & GF_ROLE_LOCKED) != 0; }

/* Seal, one step: the tail word `w` as loaded or found. GF_DONE when it is
 * sealed already, else GF_OK and the word to CAS in (SYNC POINT: ring-publish). */
static inline int gf_rc_seal_step(uint64_t w, uint64_t *desired) {
    if (w & GF_TAIL_SEALED) return GF_DONE;
    *desired = w | GF_TAIL_SEALED;
    return GF_OK;
}

/* Advance the epoch, one step: GF_OK (CAS `cur` -> new_epoch) while new_epoch
 * is newer than the epoch found, else GF_E_FENCED. */
static inline int gf_rc_epoch_step(uint64_t cur, uint64_t new_epoch) { return new_epoch > cur ? GF_OK : GF_E_FENCED; }

/* ... then the tail word `w` retagged with the new epoch (position and SEALED
 * kept): producers of older epochs fail their publish CAS at the target. */
static inline uint64_t gf_rc_retag(uint64_t w, uint64_t new_epoch) {
    return (w & ~GF_TAIL_TAG_MASK) | gf_rc_tag(new_epoch);
}

/* acked only grows: GF_OK (CAS `cur` -> seq) while seq is past it, else GF_DONE. */
static inline int gf_rc_acked_step(uint64_t cur, uint64_t seq) { return seq > cur ? GF_OK : GF_DONE; }

/* ------------------------------------------------------------- producer */

/* head as the producer may use it: aligned, not past the published tail, not
 * more than a ring behind it, and never moving backwards. */
static inline int gf_rc_head_ok(uint64_t head, uint64_t tail, uint64_t cap, uint64_t floor) {
    return !GF_POS_MISALIGNED(head) && head <= tail && tail - head <= cap && head >= floor;
}

/* Start a producer's state from the words read when it took the role: the
 * tail word (acquire), head, next_seq. Sealed, fenced (another epoch's tag)
 * or impossible positions refuse the start. */
static inline int gf_rc_prod_start(gf_producer *p, uint64_t cap, uint64_t max_item, uint64_t epoch,
                                   uint64_t tail_word, uint64_t head, uint64_t next_seq) {
    uint64_t tag = gf_rc_tag(epoch);
    uint64_t tail = tail_word & GF_TAIL_POS_MASK;
    if (tail_word & GF_TAIL_SEALED) return GF_E_SEALED;
    if ((tail_word & GF_TAIL_TAG_MASK) != tag) return GF_E_FENCED;
    if (GF_POS_MISALIGNED(tail) || !gf_rc_head_ok(head, tail, cap, 0)) return GF_E_CORRUPT;
    if (next_seq > GF_SEQ_LIMIT) return GF_E_CORRUPT; /* would wrap within 2**40 items: not a real count */
    p->capacity = cap;
    p->mask = cap - 1;
    p->max_item = max_item;
    p->epoch = epoch;
    p->tag = tag;
    p->tail = p->claim = tail;
    p->head_cache = head;
    p->next_seq = p->pub_seq = next_seq;
    p->publish_every = cap / 8 > 4096 ? cap / 8 : 4096;
    return GF_OK;
}

/* Is the tail word `w` the one this producer published (its tag, its
 * position, not sealed)? Checked before writing a byte, so that a producer
 * whose epoch was superseded does not write over what the new owner
 * published (this narrows, but cannot close, the window for a stale producer
 * that is mid-copy at the instant of a takeover: in-place takeover assumes a
 * dead or paused predecessor, which is why relocation moves to a fresh
 * queue). GF_OK, or GF_LOST: ask gf_rc_lost_tail why. */
static inline int gf_rc_owns(const gf_producer *p, uint64_t w) { return w == (p->tag | p->tail) ? GF_OK : GF_LOST; }

/* Why the tail word `w` is not the one this producer published: sealed;
 * fenced (the epoch, `epoch_now` as the caller loaded it, moved on); or, with
 * our epoch still in place, written by something that does not follow the
 * protocol: corrupt. */
static inline int gf_rc_lost_tail(const gf_producer *p, uint64_t w, uint64_t epoch_now) {
    if (w & GF_TAIL_SEALED) return GF_E_SEALED;
    if ((w & GF_TAIL_TAG_MASK) != p->tag || epoch_now != p->epoch) return GF_E_FENCED;
    return GF_E_CORRUPT;
}

/* A freshly loaded head (SYNC POINT: ring-release) into the head cache, if it
 * makes sense. */
static inline int gf_rc_set_head(gf_producer *p, uint64_t head) {
    if (!gf_rc_head_ok(head, p->tail, p->capacity, p->head_cache)) return GF_E_CORRUPT;
    p->head_cache = head;
    return GF_OK;
}

/* Ring bytes the next record of payload `len` takes at claim: the record,
 * plus the padding to the end of the ring first when it would straddle it
 * (*pad: 0 or those bytes). */
static inline uint64_t gf_rc_need(const gf_producer *p, uint64_t len, uint64_t *pad) {
    uint64_t rs = gf_rc_record_size(len);
    uint64_t idx = p->claim & p->mask;
    *pad = idx + rs > p->capacity ? p->capacity - idx : 0;
    return *pad + rs;
}

/* Room for `need` bytes past claim, as far as the head cache knows? */
static inline int gf_rc_room(const gf_producer *p, uint64_t need) { return p->claim + need - p->head_cache <= p->capacity; }

/* The padding record before a record that would straddle the wrap (`pad`
 * bytes, 0: none), written at claim, and claim moved past it; returns the
 * index the record itself goes to. */
static inline uint64_t gf_rc_skip_pad(gf_producer *p, uint8_t *data, uint64_t pad) {
    uint64_t idx = p->claim & p->mask;
    if (pad) {
        gf_record_header *r = (gf_record_header *)(data + idx);
        r->length = (uint32_t)(pad - GF_RECORD_HEADER_SIZE);
        r->type = GF_RECORD_PADDING;
        r->seq = 0;
        p->claim += pad;
        idx = 0;
    }
    return idx;
}

/* Place one DATA record of payload `len` at claim in `data` (an image laid
 * out like the ring's data area: index = position & mask), after a PADDING
 * record of `pad` bytes (from gf_rc_need) when it is not 0. Writes the
 * headers, takes a sequence number, moves claim past the padding (the caller
 * moves it past the record once the payload is in) and returns the record's
 * index. Room must have been checked. */
static inline uint64_t gf_rc_place(gf_producer *p, uint8_t *data, uint64_t len, uint64_t pad) {
    uint64_t idx = gf_rc_skip_pad(p, data, pad);
    gf_record_header *r = (gf_record_header *)(data + idx);
    r->length = (uint32_t)len;
    r->type = GF_RECORD_DATA;
    r->seq = p->next_seq++;
    return idx;
}

/* The publish CAS of the tail word: what it expects and what it stores. */
static inline uint64_t gf_rc_publish_expected(const gf_producer *p) { return p->tag | p->tail; }
static inline uint64_t gf_rc_publish_desired(const gf_producer *p) { return p->tag | p->claim; }

/* Forget what was placed since the last publish (a failed publish, an abort). */
static inline void gf_rc_rollback(gf_producer *p) {
    p->claim = p->tail;
    p->next_seq = p->pub_seq;
}

/* The publish CAS found `found`: published (GF_OK), or GF_LOST after the
 * unpublished records are forgotten (ask gf_rc_lost_tail why). */
static inline int gf_rc_published(gf_producer *p, uint64_t found) {
    if (found != gf_rc_publish_expected(p)) {
        gf_rc_rollback(p);
        return GF_LOST;
    }
    p->tail = p->claim;
    p->pub_seq = p->next_seq;
    return GF_OK;
}

/* Reserve: a record of payload `len` (room checked) at claim, after the
 * padding record when it would straddle the wrap (written now), remembered
 * with its sequence number; its payload is written in place before
 * gf_rc_commit, which writes its header (once: the header line is not touched
 * twice while the consumer may be reading the record before it on the same
 * line). Returns its index. */
static inline uint64_t gf_rc_reserve(gf_producer *p, uint8_t *data, uint64_t len, uint64_t pad) {
    uint64_t idx = gf_rc_skip_pad(p, data, pad);
    p->reserved = 1;
    p->reserved_at = p->claim;
    p->reserved_len = len;
    p->reserved_seq = p->next_seq++; /* kept here, never read back from the ring */
    return idx;
}

/* Commit the first `len` bytes of the reservation: the record's header
 * written, claim past it (the caller publishes). */
static inline int gf_rc_commit(gf_producer *p, uint8_t *data, uint64_t len) {
    if (!p->reserved || len == 0 || len > p->reserved_len) return GF_E_ARG;
    gf_record_header *r = (gf_record_header *)(data + (p->reserved_at & p->mask));
    r->length = (uint32_t)len;
    r->type = GF_RECORD_DATA;
    r->seq = p->reserved_seq;
    p->claim = p->reserved_at + gf_rc_record_size(len);
    p->reserved = 0;
    return GF_OK;
}

static inline void gf_rc_abort(gf_producer *p) {
    gf_rc_rollback(p);
    p->reserved = 0;
}

/* ------------------------------------------------------------- consumer */

/* Start a consumer's state from head and the tail word it read after taking
 * the role. */
static inline int gf_rc_cons_start(gf_consumer *c, uint64_t cap, uint64_t max_item, uint64_t head,
                                   uint64_t tail_word) {
    uint64_t tail = tail_word & GF_TAIL_POS_MASK;
    if (GF_POS_MISALIGNED(head) || GF_POS_MISALIGNED(tail) || tail < head || tail - head > cap) return GF_E_CORRUPT;
    c->capacity = cap;
    c->mask = cap - 1;
    c->max_item = max_item;
    c->head = c->rpos = c->tail_cache = head;
    c->have_seq = 0;
    c->last_seq = 0;
    return GF_OK;
}

/* A freshly loaded tail word (SYNC POINT: ring-publish) into the tail cache:
 * GF_OK (records to read), GF_EMPTY, GF_END (sealed and drained), or
 * GF_E_CORRUPT for a position that is misaligned, behind what was read, or
 * more than a ring past head. */
static inline int gf_rc_set_tail(gf_consumer *c, uint64_t w) {
    uint64_t pos = w & GF_TAIL_POS_MASK;
    if (GF_POS_MISALIGNED(pos) || pos < c->rpos || pos - c->head > c->capacity) return GF_E_CORRUPT;
    c->tail_cache = pos;
    if (pos == c->rpos) return (w & GF_TAIL_SEALED) ? GF_END : GF_EMPTY;
    return GF_OK;
}

/* The next DATA record at rpos in `data` (an image of the ring's data area
 * whose bytes are valid up to position `avail`), skipping padding unless
 * stop_at_padding. Each header word is read once and checked (what is
 * returned is what was checked):
 *   GF_OK        *rec_idx, *len_out, *seq_out set (rpos not moved);
 *   GF_TAIL      rpos reached the tail cache: load the tail (gf_rc_set_tail);
 *   GF_READ      bytes up to position *len_out are needed in the image;
 *   GF_PADDING   a padding record, stopped at it;
 *   GF_E_CORRUPT.
 * rpos is always a multiple of GF_RECORD_ALIGN (validated at start, advanced
 * by multiples of it, or to the ring's end), so idx is too. */
static inline int gf_rc_next(gf_consumer *c, const uint8_t *data, uint64_t avail, int stop_at_padding,
                             uint64_t *rec_idx, uint64_t *len_out, uint64_t *seq_out) {
    for (;;) {
        if (c->rpos == c->tail_cache) return GF_TAIL;
        if (c->rpos + GF_RECORD_HEADER_SIZE > avail) {
            *len_out = c->rpos + GF_RECORD_HEADER_SIZE;
            return GF_READ;
        }
        uint64_t idx = c->rpos & c->mask;
        const gf_record_header *r = (const gf_record_header *)(data + idx);
        uint32_t len = gf_load_relaxed_u32(&r->length), type = gf_load_relaxed_u32(&r->type);
        if (type == GF_RECORD_PADDING) {
            if (idx + GF_RECORD_HEADER_SIZE + (uint64_t)len != c->capacity) return GF_E_CORRUPT;
            if (c->rpos + (c->capacity - idx) > c->tail_cache) return GF_E_CORRUPT;
            if (stop_at_padding) return GF_PADDING;
            c->rpos += c->capacity - idx;
            continue;
        }
        uint64_t rs = gf_rc_record_size(len);
        if (type != GF_RECORD_DATA || len == 0 || len > c->max_item || idx + rs > c->capacity ||
            c->rpos + rs > c->tail_cache)
            return GF_E_CORRUPT;
        if (c->rpos + rs > avail) {
            *len_out = c->rpos + rs;
            return GF_READ;
        }
        uint64_t seq = gf_load_relaxed_u64(&r->seq);
        if (c->have_seq && seq <= c->last_seq) return GF_E_CORRUPT; /* sequence numbers only grow */
        *rec_idx = idx;
        *len_out = len;
        *seq_out = seq;
        return GF_OK;
    }
}

/* Take the record gf_rc_next returned: rpos past it, its sequence number the
 * last one seen. */
static inline void gf_rc_take(gf_consumer *c, uint64_t len, uint64_t seq) {
    c->rpos += gf_rc_record_size(len);
    c->last_seq = seq;
    c->have_seq = 1;
}

/* Release tokens. Each item or batch handed out holds a token, with the
 * position its records end at; head moves past a token once it and every
 * older one are released (items may be released in any order). */
static inline int gf_rc_pend_push(gf_consumer *c, uint64_t end, uint64_t *token) {
    if (c->pend_next - c->pend_first > c->pend_mask) return GF_E_HELD;
    uint64_t t = c->pend_next++;
    c->pend_end[t & c->pend_mask] = end;
    c->pend_done[t & c->pend_mask] = 0;
    *token = t;
    return GF_OK;
}

/* Release `token`: GF_E_ARG when it is not outstanding; 1 when head moved
 * (c->head is the new head, for the caller to store: SYNC POINT:
 * ring-release), else 0. */
static inline int gf_rc_release(gf_consumer *c, uint64_t token) {
    if (token < c->pend_first || token >= c->pend_next) return GF_E_ARG;
    c->pend_done[token & c->pend_mask] = 1;
    if (token != c->pend_first) return 0;
    uint64_t head = c->head;
    while (c->pend_first < c->pend_next && c->pend_done[c->pend_first & c->pend_mask]) {
        head = c->pend_end[c->pend_first & c->pend_mask];
        c->pend_done[c->pend_first & c->pend_mask] = 0;
        c->pend_first++;
    }
    c->head = head;
    return 1;
}

#endif /* GF_RING_CORE_H */
