/*
 * gf_ring_core.c: the ring core (gf_ring_core.h) exported for a caller that
 * brings the shared words itself: the one-sided path (grafos_fabric/queue/_onesided*.py), whose
 * region is reached only with load64/cas64/read_into/write. Each function is
 * a thin wrapper of the same inline function the mapped path (gf_native.c)
 * calls; the framing and parsing loops run here so that no Python loop runs
 * per record. No I/O: `image` is a local buffer laid out like the ring's data
 * area (capacity bytes, index = position & mask).
 */
#include "gf_ring_core.h"

uint64_t gf_ring_tag(uint64_t epoch) { return gf_rc_tag(epoch); }

int gf_ring_build(void *header_image, uint64_t region_size, uint64_t capacity, uint64_t max_item,
                  uint64_t first_seq, uint64_t epoch, const char *dtype, uint32_t dtype_len, uint32_t flags) {
    if (!header_image) return GF_E_ARG;
    return gf_rc_build((gf_ring_header *)header_image, region_size, capacity, max_item, first_seq, epoch, dtype,
                       dtype_len, flags);
}

/* ---------------------------------------------------- roles, seal, epoch, acked */

int gf_ring_claim_verdict(uint64_t epoch, uint64_t epoch_now, uint64_t holder, int lock) {
    return gf_rc_claim_verdict(epoch, epoch_now, holder, lock);
}

int gf_ring_claimed(uint64_t found, uint64_t id) { return gf_rc_claimed(found, id); }

int gf_ring_reclaimable(uint64_t holder) { return gf_rc_reclaimable(holder); }

int gf_ring_seal_step(uint64_t tail_word, uint64_t *desired) {
    if (!desired) return GF_E_ARG;
    return gf_rc_seal_step(tail_word, desired);
}

int gf_ring_epoch_step(uint64_t cur, uint64_t new_epoch) { return gf_rc_epoch_step(cur, new_epoch); }

uint64_t gf_ring_retag(uint64_t tail_word, uint64_t new_epoch) { return gf_rc_retag(tail_word, new_epoch); }

int gf_ring_acked_step(uint64_t cur, uint64_t seq) { return gf_rc_acked_step(cur, seq); }

/* ---------------------------------------------------------------- producer */

int gf_ring_prod_start(gf_producer *p, uint64_t capacity, uint64_t max_item, uint64_t epoch, uint64_t tail_word,
                       uint64_t head, uint64_t next_seq) {
    if (!p) return GF_E_ARG;
    memset(p, 0, sizeof(*p));
    /* the geometry came from a header this caller validated (gf_ring_check) */
    if (gf_rc_geometry(capacity, max_item, GF_RING_HEADER_SIZE + capacity)) return GF_E_CORRUPT;
    return gf_rc_prod_start(p, capacity, max_item, epoch, tail_word, head, next_seq);
}

int gf_ring_owns(const gf_producer *p, uint64_t tail_word) { return gf_rc_owns(p, tail_word); }

int gf_ring_lost_tail(const gf_producer *p, uint64_t tail_word, uint64_t epoch_now) {
    return gf_rc_lost_tail(p, tail_word, epoch_now);
}

int gf_ring_set_head(gf_producer *p, uint64_t head) { return gf_rc_set_head(p, head); }

uint64_t gf_ring_need(const gf_producer *p, uint64_t len) {
    uint64_t pad;
    return gf_rc_need(p, len, &pad);
}

int gf_ring_room(const gf_producer *p, uint64_t need) { return gf_rc_room(p, need); }

/* Frame records into `image` at claim, as many of the n items as the head
 * cache says fit (no head is loaded here: the caller refreshes it with
 * gf_ring_set_head and calls again). Items: n payloads of lens[i] bytes
 * concatenated at src, or (lens NULL) n rows of row_len bytes, row_stride
 * apart. io[0] is the next item to frame and io[1] its byte offset in src
 * (both in/out: a call carries on where the last one stopped); io[2] is set
 * to the index of a padding record placed at the wrap (unchanged when none).
 * Each record's alignment tail is zeroed (the image is written out whole).
 * GF_OK when all n are framed, GF_FULL when the cache said no room first,
 * GF_E_ARG / GF_E_TOO_LARGE for a bad length (nothing framed from that item
 * on). */
int gf_ring_frame(gf_producer *p, uint8_t *image, const char *src, const uint64_t *lens, uint64_t n,
                  uint64_t row_len, uint64_t row_stride, uint64_t *io) {
    if (!p || !image || !io || p->reserved) return GF_E_ARG;
    const uint8_t *from = (const uint8_t *)src;
    for (uint64_t i = io[0]; i < n; i++) {
        uint64_t len = lens ? lens[i] : row_len;
        if (len == 0) return GF_E_ARG;
        if (len > p->max_item) return GF_E_TOO_LARGE;
        uint64_t pad, need = gf_rc_need(p, len, &pad);
        if (!gf_rc_room(p, need)) return GF_FULL;
        if (pad) io[2] = p->claim & p->mask;
        uint64_t idx = gf_rc_place(p, image, len, pad);
        uint64_t rs = gf_rc_record_size(len);
        memcpy(image + idx + GF_RECORD_HEADER_SIZE, from + io[1], len);
        memset(image + idx + GF_RECORD_HEADER_SIZE + len, 0, rs - GF_RECORD_HEADER_SIZE - len);
        p->claim += rs;
        io[1] += lens ? len : row_stride;
        io[0] = i + 1;
    }
    return GF_OK;
}

/* Reserve a record of payload `len` in `image` (room by the head cache, as
 * gf_ring_frame): *payload_idx is where its payload goes in the image. */
int gf_ring_reserve_in(gf_producer *p, uint8_t *image, uint64_t len, uint64_t *payload_idx, uint64_t *pad_at) {
    if (!p || !image || p->reserved) return GF_E_ARG;
    if (len == 0) return GF_E_ARG;
    if (len > p->max_item) return GF_E_TOO_LARGE;
    uint64_t pad, need = gf_rc_need(p, len, &pad);
    if (!gf_rc_room(p, need)) return GF_FULL;
    if (pad) *pad_at = p->claim & p->mask;
    *payload_idx = gf_rc_reserve(p, image, len, pad) + GF_RECORD_HEADER_SIZE;
    return GF_OK;
}

/* Commit the first `len` bytes of the reservation (alignment tail zeroed);
 * the caller writes the image out and publishes. */
int gf_ring_commit_in(gf_producer *p, uint8_t *image, uint64_t len, uint64_t *seq_out) {
    if (!p || !image) return GF_E_ARG;
    uint64_t seq = p->reserved_seq, at = p->reserved_at;
    int rc = gf_rc_commit(p, image, len);
    if (rc) return rc;
    uint64_t idx = (at & p->mask) + GF_RECORD_HEADER_SIZE;
    memset(image + idx + len, 0, gf_rc_record_size(len) - GF_RECORD_HEADER_SIZE - len);
    *seq_out = seq;
    return GF_OK;
}

void gf_ring_abort_in(gf_producer *p) { gf_rc_abort(p); }

uint64_t gf_ring_publish_expected(const gf_producer *p) { return gf_rc_publish_expected(p); }
uint64_t gf_ring_publish_desired(const gf_producer *p) { return gf_rc_publish_desired(p); }
int gf_ring_published(gf_producer *p, uint64_t found) { return gf_rc_published(p, found); }
void gf_ring_rollback(gf_producer *p) { gf_rc_rollback(p); }

/* ---------------------------------------------------------------- consumer */

int gf_ring_cons_start(gf_consumer *c, uint64_t capacity, uint64_t max_item, uint64_t head, uint64_t tail_word,
                       uint64_t *pend_end, uint8_t *pend_done, uint64_t pend_cap) {
    if (!c || !pend_end || !pend_done || !gf_rc_is_pow2(pend_cap)) return GF_E_ARG;
    memset(c, 0, sizeof(*c));
    if (gf_rc_geometry(capacity, max_item, GF_RING_HEADER_SIZE + capacity)) return GF_E_CORRUPT;
    c->pend_end = pend_end;
    c->pend_done = pend_done;
    c->pend_mask = pend_cap - 1;
    return gf_rc_cons_start(c, capacity, max_item, head, tail_word);
}

/* The release tokens, serialized by the consumer's lock: a popping thread and
 * a finalizer releasing an item in another thread may call at once (cffi lets
 * go of the GIL). Storing the new head is the caller's, one store at a time,
 * never a smaller value after a larger one. */
int gf_ring_pend_push(gf_consumer *c, uint64_t end, uint64_t *token) {
    gf_lock(&c->lock);
    int rc = gf_rc_pend_push(c, end, token);
    gf_unlock(&c->lock);
    return rc;
}

int gf_ring_release(gf_consumer *c, uint64_t token) {
    gf_lock(&c->lock);
    int rc = gf_rc_release(c, token);
    gf_unlock(&c->lock);
    return rc;
}

int gf_ring_set_tail(gf_consumer *c, uint64_t tail_word) { return gf_rc_set_tail(c, tail_word); }

/* Parse records at rpos from `image` (valid up to position `avail`) into
 * offs/lens/seqs from index *n_io on, up to max_items in all, as the mapped
 * pop does: a batch stops at the wrap (payloads stay contiguous). *uniform_io
 * is the common payload length so far (0: mixed). Returns GF_OK (stopped at
 * max_items or the wrap), GF_PADDING (stopped at it), GF_TAIL (the tail cache
 * is reached: load the tail, gf_ring_set_tail, call again), GF_READ (bring
 * the image up to *need, call again) or GF_E_CORRUPT (records taken before it
 * stay taken; the next call reports it again). */
int gf_ring_take(gf_consumer *c, const uint8_t *image, uint64_t avail, uint64_t max_items, uint64_t *offs,
                 uint64_t *lens, uint64_t *seqs, uint64_t *n_io, uint64_t *uniform_io, uint64_t *need) {
    uint64_t n = *n_io, uni = *uniform_io;
    int rc = GF_OK;
    while (n < max_items) {
        if (n > 0 && (c->rpos & c->mask) == 0) break;
        uint64_t idx, len, seq;
        rc = gf_rc_next(c, image, avail, n > 0, &idx, &len, &seq);
        if (rc == GF_READ) *need = len;
        if (rc) break;
        offs[n] = idx + GF_RECORD_HEADER_SIZE;
        lens[n] = len;
        seqs[n] = seq;
        gf_rc_take(c, len, seq);
        if (n == 0) uni = len;
        else if (uni != len) uni = 0;
        n++;
    }
    *n_io = n;
    *uniform_io = uni;
    return rc;
}
