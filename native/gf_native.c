/*
 * gf_native.c: the hot path. Ring push/pop (single, batched, reserve/commit),
 * blocking waits on futexes, segment headers, and the generic atomics that the
 * shm driver's one-sided operations use. See gf_ring.h for the protocol.
 * The protocol's decisions (geometry, role start, owner check, place,
 * publish, record parsing) are the pure functions of gf_ring_core.h; this
 * file brings the shared words to them with atomics and waits on futexes
 * (gf_ring_core.c exports the same functions to the one-sided path).
 *
 * Why C and not a library: this is the per-item hot path; each push/pop is one
 * call with no allocation, and the batch framing loops run here, not in Python.
 */
#include <string.h>
#include "gf_native.h"
#include "gf_ring_core.h"

int gf_native_abi(void) { return GF_NATIVE_ABI; }

#define rec_size gf_rc_record_size
uint64_t gf_record_size(uint64_t length) { return rec_size(length); }

/* ------------------------------------------------------------------ leases */

static inline int gf_lease_status(const volatile uint64_t *state, const volatile uint64_t *deadline, uint64_t now_ns) {
    if (!state) return GF_OK;
    uint64_t s = gf_load_acquire_u64(state); /* SYNC POINT: lease-state */
    if (s != GF_LEASE_ACTIVE) return s == GF_LEASE_REVOKED ? GF_E_REVOKED : GF_E_EXPIRED;
    if (now_ns == 0) now_ns = gf_monotonic_ns();
    if (now_ns >= gf_load_acquire_u64(deadline)) return GF_E_EXPIRED; /* SYNC POINT: lease-state */
    return GF_OK;
}

/* ---------------------------------------------------------------- segments */

int gf_segment_init(void *seg, uint64_t segment_size, const uint8_t *lease_id, uint64_t generation,
                    uint64_t ttl_ns, uint64_t created_ns, uint64_t deadline_ns, uint64_t pid) {
    if (!seg || segment_size < GF_SEG_HEADER_SIZE) return GF_E_ARG;
    gf_segment_header *h = (gf_segment_header *)seg;
    h->magic = GF_SEG_MAGIC;
    h->header_size = GF_SEG_HEADER_SIZE;
    h->segment_size = segment_size;
    h->payload_size = segment_size - GF_SEG_HEADER_SIZE;
    memcpy(h->lease_id, lease_id, 16);
    h->generation = generation;
    h->ttl_ns = ttl_ns;
    h->created_ns = created_ns;
    h->owner_pid = pid;
    h->deadline_ns = deadline_ns;
    h->lease_state = GF_LEASE_ACTIVE;
    /* SYNC POINT: segment-ready (everything above is visible before the version) */
    __atomic_store_n(&h->layout_version, GF_SEG_LAYOUT_VERSION, __ATOMIC_RELEASE);
    return GF_OK;
}

int gf_segment_check(const void *seg, uint64_t mapped_size) {
    if (!seg || mapped_size < GF_SEG_HEADER_SIZE) return GF_E_CORRUPT;
    const gf_segment_header *h = (const gf_segment_header *)seg;
    /* SYNC POINT: segment-ready */
    uint32_t version = gf_load_acquire_u32(&h->layout_version);
    uint64_t magic = gf_load_relaxed_u64(&h->magic);
    if (version == 0) return magic == 0 || magic == GF_SEG_MAGIC ? GF_E_NOT_READY : GF_E_CORRUPT;
    if (magic != GF_SEG_MAGIC) return GF_E_CORRUPT;
    if (version != GF_SEG_LAYOUT_VERSION) return GF_E_VERSION;
    uint32_t header_size = gf_load_relaxed_u32(&h->header_size);
    uint64_t segment_size = gf_load_relaxed_u64(&h->segment_size);
    uint64_t payload_size = gf_load_relaxed_u64(&h->payload_size);
    if (header_size != GF_SEG_HEADER_SIZE || segment_size != mapped_size ||
        payload_size != mapped_size - GF_SEG_HEADER_SIZE)
        return GF_E_CORRUPT;
    return GF_OK;
}

/* ------------------------------------------------------- generic atomics */

uint64_t gf_load_acquire_at(void *base, uint64_t off) {
    return gf_load_acquire_u64((volatile uint64_t *)((uint8_t *)base + off));
}
void gf_store_release_at(void *base, uint64_t off, uint64_t value) {
    gf_store_release_u64((volatile uint64_t *)((uint8_t *)base + off), value);
}
uint64_t gf_cas_at(void *base, uint64_t off, uint64_t expected, uint64_t desired) {
    return gf_cas_u64((volatile uint64_t *)((uint8_t *)base + off), expected, desired);
}
uint64_t gf_faa_at(void *base, uint64_t off, uint64_t add) {
    return gf_faa_u64((volatile uint64_t *)((uint8_t *)base + off), add);
}

/* ------------------------------------------------------------------- rings */

int gf_ring_init(void *ring, uint64_t region_size, uint64_t capacity, uint64_t max_item, uint64_t first_seq,
                 uint64_t epoch, const char *dtype, uint32_t dtype_len, uint32_t flags) {
    if (!ring) return GF_E_ARG;
    gf_ring_header *h = (gf_ring_header *)ring;
    int rc = gf_rc_build(h, region_size, capacity, max_item, first_seq, epoch, dtype, dtype_len, flags);
    if (rc) return rc;
    /* SYNC POINT: ring-ready */
    __atomic_store_n(&h->version, GF_RING_LAYOUT_VERSION, __ATOMIC_RELEASE);
    return GF_OK;
}

/* The ring's geometry, each word read once and checked (gf_rc_geometry)
 * against the region the caller mapped. */
static int ring_geometry(const gf_ring_header *h, uint64_t region_size, uint64_t *cap_out, uint64_t *max_item_out) {
    if (region_size < GF_RING_HEADER_SIZE) return GF_E_CORRUPT;
    uint64_t cap = gf_load_relaxed_u64(&h->capacity);
    uint64_t max_item = gf_load_relaxed_u64(&h->max_item);
    if (gf_rc_geometry(cap, max_item, region_size)) return GF_E_CORRUPT;
    *cap_out = cap;
    *max_item_out = max_item;
    return GF_OK;
}

int gf_ring_check(const void *ring, uint64_t region_size) {
    if (!ring || region_size < GF_RING_HEADER_SIZE) return GF_E_CORRUPT;
    const gf_ring_header *h = (const gf_ring_header *)ring;
    /* SYNC POINT: ring-ready */
    uint32_t version = gf_load_acquire_u32(&h->version);
    uint32_t magic = gf_load_relaxed_u32(&h->magic);
    if (version == 0) return magic == 0 || magic == GF_RING_MAGIC ? GF_E_NOT_READY : GF_E_CORRUPT;
    if (magic != GF_RING_MAGIC) return GF_E_CORRUPT;
    if (version != GF_RING_LAYOUT_VERSION) return GF_E_VERSION;
    uint64_t cap, max_item;
    if (ring_geometry(h, region_size, &cap, &max_item)) return GF_E_CORRUPT;
    if (gf_load_relaxed_u32(&h->dtype_len) > GF_DTYPE_MAX) return GF_E_CORRUPT;
    /* positions are only ever multiples of the record alignment (their order
     * is checked by each role, which knows which of them is its own) */
    uint64_t head = gf_load_acquire_u64(&h->head);
    uint64_t tail = gf_load_acquire_u64(&h->tail) & GF_TAIL_POS_MASK;
    if (GF_POS_MISALIGNED(head) || GF_POS_MISALIGNED(tail)) return GF_E_CORRUPT;
    return GF_OK;
}

static void wake_both(gf_ring_header *h) {
    gf_faa_u32(&h->data_futex, 1);
    gf_futex_wake_all(&h->data_futex);
    gf_faa_u32(&h->space_futex, 1);
    gf_futex_wake_all(&h->space_futex);
}

/* A CAS loop on a shared word gives up after this many lost races: only a
 * writer that changes the word all the time (not a peer following the
 * protocol, which publishes between two of our tries at most a few times)
 * loses it that often, and it must not keep us spinning forever. */
#define GF_CAS_TRIES (1u << 20)

int gf_ring_seal(void *ring, uint64_t seal_seq) {
    if (!ring) return GF_E_ARG;
    gf_ring_header *h = (gf_ring_header *)ring;
    uint64_t w = gf_load_acquire_u64(&h->tail), desired;
    if (gf_rc_seal_step(w, &desired) == GF_DONE) return 1; /* already sealed */
    __atomic_store_n(&h->seal_seq, seal_seq, __ATOMIC_RELAXED);
    for (uint32_t tries = 0;; tries++) {
        if (tries == GF_CAS_TRIES) return GF_E_CORRUPT;
        uint64_t found = gf_cas_u64(&h->tail, w, desired); /* SYNC POINT: ring-publish */
        if (found == w) break;
        w = found;
        if (gf_rc_seal_step(w, &desired) == GF_DONE) return 1;
    }
    wake_both(h);
    return GF_OK;
}

int gf_ring_advance_epoch(void *ring, uint64_t new_epoch) {
    if (!ring) return GF_E_ARG;
    gf_ring_header *h = (gf_ring_header *)ring;
    uint64_t cur = gf_load_acquire_u64(&h->epoch);
    for (uint32_t tries = 0;; tries++) {
        if (gf_rc_epoch_step(cur, new_epoch) != GF_OK) return GF_E_FENCED;
        if (tries == GF_CAS_TRIES) return GF_E_CORRUPT;
        uint64_t found = gf_cas_u64(&h->epoch, cur, new_epoch);
        if (found == cur) break;
        cur = found;
    }
    uint64_t w = gf_load_acquire_u64(&h->tail);
    for (uint32_t tries = 0;; tries++) {
        if (tries == GF_CAS_TRIES) return GF_E_CORRUPT;
        uint64_t found = gf_cas_u64(&h->tail, w, gf_rc_retag(w, new_epoch));
        if (found == w) break;
        w = found;
    }
    wake_both(h);
    return GF_OK;
}

int gf_ring_set_acked(void *ring, uint64_t seq) {
    if (!ring) return GF_E_ARG;
    gf_ring_header *h = (gf_ring_header *)ring;
    uint64_t cur = gf_load_acquire_u64(&h->acked);
    for (uint32_t tries = 0;; tries++) {
        if (gf_rc_acked_step(cur, seq) == GF_DONE) return GF_OK;
        if (tries == GF_CAS_TRIES) return GF_E_CORRUPT;
        uint64_t found = gf_cas_u64(&h->acked, cur, seq);
        if (found == cur) return GF_OK;
        cur = found;
    }
}

/* ---------------------------------------------------------------- producer */

int gf_producer_init(gf_producer *p, void *ring, uint64_t region_size, volatile uint64_t *lease_state,
                     volatile uint64_t *lease_deadline, uint64_t epoch, uint64_t id) {
    if (!p || !ring || id == 0) return GF_E_ARG;
    gf_ring_header *h = (gf_ring_header *)ring;
    memset(p, 0, sizeof(*p));
    uint64_t cap, max_item;
    if (ring_geometry(h, region_size, &cap, &max_item)) return GF_E_CORRUPT;
    /* the caller (grafos_fabric.queue._mapped_push) judged the holder and the
     * role lock with the same verdict; here only the epoch, as it is now */
    int how = gf_rc_claim_verdict(epoch, gf_load_acquire_u64(&h->epoch), 0, GF_LOCK_NONE);
    if (how == GF_E_FENCED) return GF_E_FENCED;
    if (how == GF_CLAIM_TAKEOVER) {
        int rc = gf_ring_advance_epoch(ring, epoch);
        if (rc) return rc;
        __atomic_store_n(&h->producer_id, id, __ATOMIC_SEQ_CST); /* take over: the old holder is fenced */
    } else if (gf_rc_claimed(gf_cas_u64(&h->producer_id, 0, id), id) != GF_OK) {
        return GF_E_ROLE;
    }
    /* the role is ours from here: every failure gives it back */
    uint64_t w = gf_load_acquire_u64(&h->tail); /* SYNC POINT: ring-publish */
    uint64_t head = gf_load_acquire_u64(&h->head); /* SYNC POINT: ring-release */
    uint64_t next_seq = gf_load_acquire_u64(&h->next_seq);
    int rc = gf_rc_prod_start(p, cap, max_item, epoch, w, head, next_seq);
    if (rc) {
        gf_cas_u64(&h->producer_id, id, 0);
        return rc;
    }
    p->hdr = h;
    p->data = (uint8_t *)ring + GF_RING_HEADER_SIZE;
    p->lease_state = lease_state;
    p->lease_deadline = lease_deadline;
    p->id = id;
    p->data_woke = gf_load_seq_cst_u32(&h->data_futex) - 1; /* not the word's value: a sleeper now is woken */
    return GF_OK;
}

int gf_producer_close(gf_producer *p) {
    if (!p) return GF_OK;
    gf_lock(&p->lock);
    if (p->hdr) {
        gf_cas_u64(&p->hdr->producer_id, p->id, 0);
        p->hdr = NULL;
    }
    gf_unlock(&p->lock);
    return GF_OK;
}

/* The tail word is not the one this producer published: why (sealed,
 * fenced, corrupt), judged by the core with the epoch as it is now. */
static int lost_tail(gf_producer *p, uint64_t w) {
    return gf_rc_lost_tail(p, w, gf_load_acquire_u64(&p->hdr->epoch));
}

/* Why a full or failed push failed: sealed, fenced, corrupt, or really full. */
static int full_reason(gf_producer *p) {
    uint64_t w = gf_load_acquire_u64(&p->hdr->tail);
    if (gf_rc_owns(p, w) == GF_OK) return GF_FULL;
    return lost_tail(p, w);
}

/* Before writing a byte: is the tail word still ours (gf_rc_owns)? */
static inline int prod_owner(gf_producer *p) {
    uint64_t w = gf_load_acquire_u64(&p->hdr->tail); /* SYNC POINT: ring-publish */
    if (gf_rc_owns(p, w) == GF_OK) return GF_OK;
    return lost_tail(p, w);
}

/* Room for `need` bytes past claim? 1 yes, 0 no, <0 corrupt head. Loads head
 * only when the head cache says no. */
static inline int prod_room(gf_producer *p, uint64_t need) {
    if (gf_rc_room(p, need)) return 1;
    int rc = gf_rc_set_head(p, gf_load_acquire_u64(&p->hdr->head)); /* SYNC POINT: ring-release */
    if (rc) return rc;
    return gf_rc_room(p, need);
}

/* Place one record of payload `len` at claim (gf_rc_place: padding first if
 * it would straddle the wrap), when there is room. */
static inline int prod_place(gf_producer *p, uint64_t len, uint64_t *rec_idx) {
    uint64_t pad, need = gf_rc_need(p, len, &pad);
    int room = prod_room(p, need);
    if (room <= 0) return room == 0 ? GF_FULL : room;
    *rec_idx = gf_rc_place(p, p->data, len, pad);
    return GF_OK;
}

static inline int prod_publish(gf_producer *p) {
    if (p->claim == p->tail) return GF_OK;
    gf_ring_header *h = p->hdr;
    __atomic_store_n(&h->next_seq, p->next_seq, __ATOMIC_RELAXED);
    /* SYNC POINT: ring-publish (records and next_seq before the tail; full fence) */
    uint64_t found = gf_cas_u64(&h->tail, gf_rc_publish_expected(p), gf_rc_publish_desired(p));
    if (gf_rc_published(p, found) != GF_OK) return lost_tail(p, found);
    /* wake only when someone went to sleep since this producer's last wake (the
     * sleeper bumps data_futex first): one syscall per sleep, not one per publish */
    if (gf_load_seq_cst_u64(&h->data_waiters) && gf_load_seq_cst_u32(&h->data_futex) != p->data_woke) {
        p->data_woke = gf_faa_u32(&h->data_futex, 1) + 1;
        gf_futex_wake_all(&h->data_futex);
    }
    return GF_OK;
}

static int gf_push_unlocked(gf_producer *p, const void *buf, uint64_t len, uint64_t now_ns, uint64_t *seq_out) {
    if (!p->hdr) return GF_E_ARG;
    if (p->reserved) return GF_E_CLAIMED;
    int rc = gf_lease_status(p->lease_state, p->lease_deadline, now_ns);
    if (rc) return rc;
    rc = prod_owner(p);
    if (rc) return rc;
    if (len == 0) return GF_E_ARG;
    if (len > p->max_item) return GF_E_TOO_LARGE;
    uint64_t idx;
    uint64_t seq = p->next_seq;
    rc = prod_place(p, len, &idx);
    if (rc == GF_FULL) return full_reason(p);
    if (rc) return rc;
    memcpy(p->data + idx + GF_RECORD_HEADER_SIZE, buf, len);
    p->claim += rec_size(len);
    rc = prod_publish(p);
    if (rc) return rc;
    *seq_out = seq;
    return GF_OK;
}

static int gf_push_rows_unlocked(gf_producer *p, const void *base, uint64_t n, uint64_t row_stride, uint64_t len, uint64_t now_ns,
                 uint64_t *pushed) {
    *pushed = 0;
    if (!p->hdr) return GF_E_ARG;
    if (p->reserved) return GF_E_CLAIMED;
    int rc = gf_lease_status(p->lease_state, p->lease_deadline, now_ns);
    if (rc) return rc;
    rc = prod_owner(p);
    if (rc) return rc;
    if (len == 0) return GF_E_ARG;
    if (len > p->max_item) return GF_E_TOO_LARGE;
    const uint8_t *src = (const uint8_t *)base;
    uint64_t rs = rec_size(len), done = 0, published = 0;
    for (; done < n; done++) {
        uint64_t idx;
        rc = prod_place(p, len, &idx);
        if (rc) break;
        memcpy(p->data + idx + GF_RECORD_HEADER_SIZE, src + done * row_stride, len);
        p->claim += rs;
        if (p->claim - p->tail >= p->publish_every) {
            int prc = prod_publish(p);
            if (prc) return prc; /* nothing since the last publish counts */
            published = done + 1;
            *pushed = published;
        }
    }
    int prc = prod_publish(p);
    if (prc) return prc;
    *pushed = done;
    if (done == 0 && rc == GF_FULL) return full_reason(p);
    return rc < 0 ? rc : GF_OK;
}

static int gf_push_concat_unlocked(gf_producer *p, const void *base, const uint64_t *lens, uint64_t n, uint64_t now_ns,
                   uint64_t *pushed) {
    *pushed = 0;
    if (!p->hdr) return GF_E_ARG;
    if (p->reserved) return GF_E_CLAIMED;
    int rc = gf_lease_status(p->lease_state, p->lease_deadline, now_ns);
    if (rc) return rc;
    rc = prod_owner(p);
    if (rc) return rc;
    for (uint64_t i = 0; i < n; i++) {
        if (lens[i] == 0) return GF_E_ARG;
        if (lens[i] > p->max_item) return GF_E_TOO_LARGE;
    }
    const uint8_t *src = (const uint8_t *)base;
    uint64_t done = 0;
    for (; done < n; done++) {
        uint64_t idx, len = lens[done];
        rc = prod_place(p, len, &idx);
        if (rc) break;
        memcpy(p->data + idx + GF_RECORD_HEADER_SIZE, src, len);
        src += len;
        p->claim += rec_size(len);
        if (p->claim - p->tail >= p->publish_every) {
            int prc = prod_publish(p);
            if (prc) return prc;
            *pushed = done + 1;
        }
    }
    int prc = prod_publish(p);
    if (prc) return prc;
    *pushed = done;
    if (done == 0 && rc == GF_FULL) return full_reason(p);
    return rc < 0 ? rc : GF_OK;
}

static int gf_reserve_unlocked(gf_producer *p, uint64_t len, uint64_t now_ns, uint64_t *payload_off) {
    if (!p->hdr) return GF_E_ARG;
    if (p->reserved) return GF_E_CLAIMED;
    int rc = gf_lease_status(p->lease_state, p->lease_deadline, now_ns);
    if (rc) return rc;
    rc = prod_owner(p);
    if (rc) return rc;
    if (len == 0) return GF_E_ARG;
    if (len > p->max_item) return GF_E_TOO_LARGE;
    uint64_t pad, need = gf_rc_need(p, len, &pad);
    rc = prod_room(p, need);
    if (rc == 0) return full_reason(p);
    if (rc < 0) return rc;
    *payload_off = gf_rc_reserve(p, p->data, len, pad) + GF_RECORD_HEADER_SIZE;
    return GF_OK;
}

static int gf_commit_unlocked(gf_producer *p, uint64_t len, uint64_t *seq_out) {
    if (!p->hdr || p->reserved != 1) return GF_E_ARG; /* rows (gf_reserve_rows) commit with gf_commit_rows */
    uint64_t seq = p->reserved_seq; /* ours, not read back from shared memory */
    int rc = gf_rc_commit(p, p->data, len);
    if (rc) return rc;
    rc = prod_publish(p);
    if (rc) return rc;
    *seq_out = seq;
    return GF_OK;
}

static int gf_abort_unlocked(gf_producer *p) {
    if (!p->hdr || !p->reserved) return GF_E_ARG;
    gf_rc_abort(p);
    return GF_OK;
}

int gf_wait_space(gf_producer *p, uint64_t len, uint64_t timeout_ns, uint32_t spin) {
    if (!p->hdr) return GF_E_ARG;
    gf_ring_header *h = p->hdr;
    uint64_t pad, need = gf_rc_need(p, len, &pad);
    uint64_t want = p->claim + need - p->capacity; /* the head that makes room */
    /* head and tail are only compared here, never used as positions: the
     * push that follows re-reads and validates them */
    for (uint32_t i = 0; i < spin; i++) {
        uint64_t hd = gf_load_acquire_u64(&h->head); /* SYNC POINT: ring-release */
        if (hd >= want) return GF_OK;
        gf_cpu_relax();
    }
    /* sleep until a quarter of the ring is free (hysteresis), or the ring is empty */
    uint64_t lazy = want + p->capacity / 4;
    __atomic_store_n(&h->space_want, lazy < p->claim ? lazy : p->claim, __ATOMIC_RELAXED);
    gf_faa_u64(&h->space_waiters, 1);
    uint32_t v = gf_faa_u32(&h->space_futex, 1) + 1; /* a new sleep: the next release wakes it (gf_ring.h) */
    uint64_t hd = gf_load_seq_cst_u64(&h->head);
    uint64_t w = gf_load_seq_cst_u64(&h->tail);
    int rc = 0;
    if (hd < want && !(w & GF_TAIL_SEALED) && (w & GF_TAIL_TAG_MASK) == p->tag)
        rc = gf_futex_wait(&h->space_futex, v, timeout_ns);
    gf_fas_u64(&h->space_waiters, 1);
    return rc;
}

/* ---------------------------------------------------------------- consumer */

int gf_consumer_init(gf_consumer *c, void *ring, uint64_t region_size, volatile uint64_t *lease_state,
                     volatile uint64_t *lease_deadline, uint64_t id, uint64_t *pend_end, uint8_t *pend_done,
                     uint64_t pend_cap) {
    if (!c || !ring || id == 0 || !gf_rc_is_pow2(pend_cap) || !pend_end || !pend_done) return GF_E_ARG;
    gf_ring_header *h = (gf_ring_header *)ring;
    memset(c, 0, sizeof(*c));
    uint64_t cap, max_item;
    if (ring_geometry(h, region_size, &cap, &max_item)) return GF_E_CORRUPT;
    if (gf_rc_claimed(gf_cas_u64(&h->consumer_id, 0, id), id) != GF_OK) return GF_E_ROLE;
    /* head is ours from here (only the consumer stores it): read it, then the tail */
    uint64_t head = gf_load_acquire_u64(&h->head);
    uint64_t w = gf_load_acquire_u64(&h->tail); /* SYNC POINT: ring-publish */
    if (gf_rc_cons_start(c, cap, max_item, head, w)) {
        gf_cas_u64(&h->consumer_id, id, 0);
        return GF_E_CORRUPT;
    }
    c->hdr = h;
    c->data = (uint8_t *)ring + GF_RING_HEADER_SIZE;
    c->lease_state = lease_state;
    c->lease_deadline = lease_deadline;
    c->pend_end = pend_end;
    c->pend_done = pend_done;
    c->pend_mask = pend_cap - 1;
    c->id = id;
    c->space_woke = gf_load_seq_cst_u32(&h->space_futex) - 1; /* not the word's value: a sleeper now is woken */
    return GF_OK;
}

int gf_consumer_close(gf_consumer *c) {
    if (!c) return GF_OK;
    gf_lock(&c->lock);
    if (c->hdr) {
        gf_cas_u64(&c->hdr->consumer_id, c->id, 0);
        c->hdr = NULL;
    }
    gf_unlock(&c->lock);
    return GF_OK;
}

/* The next data record at rpos (gf_rc_next over the mapped data area),
 * loading the tail word whenever the tail cache is reached: GF_OK with
 * *rec_idx, *len_out, *seq_out; GF_EMPTY; GF_END (sealed, drained);
 * GF_PADDING (stopped at it); GF_E_CORRUPT. */
static inline int cons_next(gf_consumer *c, uint64_t *rec_idx, uint64_t *len_out, uint64_t *seq_out,
                            int stop_at_padding) {
    for (;;) {
        int rc = gf_rc_next(c, c->data, UINT64_MAX, stop_at_padding, rec_idx, len_out, seq_out);
        if (rc != GF_TAIL) return rc;
        rc = gf_rc_set_tail(c, gf_load_acquire_u64(&c->hdr->tail)); /* SYNC POINT: ring-publish */
        if (rc) return rc;
    }
}

#define pend_push gf_rc_pend_push

/* Pop up to max_items records (and about max_bytes of ring) in one call. With
 * per_item, every record gets a release token of its own (tokens
 * *token_out .. *token_out + n - 1, so items free their space one by one);
 * otherwise the whole batch shares one token. */
static int gf_pop_batch_unlocked(gf_consumer *c, uint64_t max_items, uint64_t max_bytes, int per_item,
                                 uint64_t now_ns, uint64_t *offs, uint64_t *lens, uint64_t *seqs, uint64_t *n_out,
                                 uint64_t *token_out, uint64_t *uniform_len) {
    *n_out = 0;
    if (!c->hdr) return GF_E_ARG;
    int rc = gf_lease_status(c->lease_state, c->lease_deadline, now_ns);
    if (rc) return rc;
    if (max_items == 0) return GF_E_ARG;
    uint64_t free_tokens = c->pend_mask + 1 - (c->pend_next - c->pend_first);
    if (free_tokens == 0) return GF_E_HELD;
    if (per_item && max_items > free_tokens) max_items = free_tokens;
    uint64_t n = 0, uni = 0, start = c->rpos;
    while (n < max_items) {
        uint64_t idx;
        /* a batch stops at the wrap (a padding record, or a record ending
         * exactly at the end of the ring): its payloads are contiguous */
        if (n > 0 && (c->rpos & c->mask) == 0) break;
        uint64_t len, seq;
        rc = cons_next(c, &idx, &len, &seq, n > 0);
        if (rc) break;
        offs[n] = idx + GF_RECORD_HEADER_SIZE;
        lens[n] = len;
        seqs[n] = seq;
        gf_rc_take(c, len, seq);
        if (n == 0) uni = len;
        else if (uni != len) uni = 0;
        n++;
        if (per_item) {
            uint64_t t = 0;
            pend_push(c, c->rpos, &t); /* cannot fail: max_items was cut to the free tokens */
            if (n == 1) *token_out = t;
        }
        if (c->rpos - start >= max_bytes) break;
    }
    if (n == 0) return rc; /* GF_EMPTY, GF_END or an error; with items, a later call reports it */
    if (!per_item) pend_push(c, c->rpos, token_out);
    *n_out = n;
    *uniform_len = uni;
    return GF_OK;
}

static int gf_release_unlocked(gf_consumer *c, uint64_t token) {
    if (!c->hdr) return GF_E_ARG;
    int moved = gf_rc_release(c, token);
    if (moved <= 0) return moved; /* GF_E_ARG, or GF_OK: an older token is still out */
    uint64_t head = c->head;
    gf_ring_header *h = c->hdr;
    gf_store_seq_cst_u64(&h->head, head); /* SYNC POINT: ring-release (full fence before the waiter check) */
    /* waiter count and space_want only decide whether to wake (a wrong value
     * costs a wake-up or a sleeper's time slice, nothing else) */
    if (gf_load_seq_cst_u64(&h->space_waiters) &&
        (head >= gf_load_relaxed_u64(&h->space_want) || c->pend_first == c->pend_next) &&
        gf_load_seq_cst_u32(&h->space_futex) != c->space_woke) { /* someone slept since our last wake */
        c->space_woke = gf_faa_u32(&h->space_futex, 1) + 1;
        gf_futex_wake_all(&h->space_futex);
    }
    return GF_OK;
}

uint64_t gf_consumer_outstanding(gf_consumer *c) { return c->pend_next - c->pend_first; }

int gf_wait_data(gf_consumer *c, uint64_t timeout_ns, uint32_t spin) {
    if (!c->hdr) return GF_E_ARG;
    gf_ring_header *h = c->hdr;
    for (uint32_t i = 0; i < spin; i++) {
        uint64_t w = gf_load_acquire_u64(&h->tail); /* SYNC POINT: ring-publish */
        if ((w & GF_TAIL_POS_MASK) != c->rpos || (w & GF_TAIL_SEALED)) return GF_OK;
        gf_cpu_relax();
    }
    gf_faa_u64(&h->data_waiters, 1);
    uint32_t v = gf_faa_u32(&h->data_futex, 1) + 1; /* a new sleep: the next publish wakes it (gf_ring.h) */
    uint64_t w = gf_load_seq_cst_u64(&h->tail); /* compared only: the pop that follows validates it */
    int rc = 0;
    if ((w & GF_TAIL_POS_MASK) == c->rpos && !(w & GF_TAIL_SEALED))
        rc = gf_futex_wait(&h->data_futex, v, timeout_ns);
    gf_fas_u64(&h->data_waiters, 1);
    return rc;
}

int gf_push(gf_producer *p, const char *buf, uint64_t len, uint64_t now_ns, uint64_t *seq_out) {
    gf_lock(&p->lock);
    int rc = gf_push_unlocked(p, buf, len, now_ns, seq_out);
    gf_unlock(&p->lock);
    return rc;
}

int gf_push_rows(gf_producer *p, const void *base, uint64_t n, uint64_t row_stride, uint64_t len, uint64_t now_ns, uint64_t *pushed) {
    gf_lock(&p->lock);
    int rc = gf_push_rows_unlocked(p, base, n, row_stride, len, now_ns, pushed);
    gf_unlock(&p->lock);
    return rc;
}

int gf_push_concat(gf_producer *p, const char *base, const uint64_t *lens, uint64_t n, uint64_t now_ns, uint64_t *pushed) {
    gf_lock(&p->lock);
    int rc = gf_push_concat_unlocked(p, base, lens, n, now_ns, pushed);
    gf_unlock(&p->lock);
    return rc;
}

int gf_reserve(gf_producer *p, uint64_t len, uint64_t now_ns, uint64_t *payload_off) {
    gf_lock(&p->lock);
    int rc = gf_reserve_unlocked(p, len, now_ns, payload_off);
    gf_unlock(&p->lock);
    return rc;
}

int gf_commit(gf_producer *p, uint64_t len, uint64_t *seq_out) {
    gf_lock(&p->lock);
    int rc = gf_commit_unlocked(p, len, seq_out);
    gf_unlock(&p->lock);
    return rc;
}

int gf_abort(gf_producer *p) {
    gf_lock(&p->lock);
    int rc = gf_abort_unlocked(p);
    gf_unlock(&p->lock);
    return rc;
}


int gf_release(gf_consumer *c, uint64_t token) {
    gf_lock(&c->lock);
    int rc = gf_release_unlocked(c, token);
    gf_unlock(&c->lock);
    return rc;
}

int gf_pop_batch(gf_consumer *c, uint64_t max_items, uint64_t max_bytes, int per_item, uint64_t now_ns,
                 uint64_t *offs, uint64_t *lens, uint64_t *seqs, uint64_t *n_out, uint64_t *token_out,
                 uint64_t *uniform_len) {
    gf_lock(&c->lock);
    int rc = gf_pop_batch_unlocked(c, max_items, max_bytes, per_item, now_ns, offs, lens, seqs, n_out, token_out,
                                   uniform_len);
    gf_unlock(&c->lock);
    return rc;
}

/* ------------------------------------------------------- reserved rows (batch) */

/* A reservation of rows is marked reserved == GF_RESERVED_ROWS (a single one:
 * 1); its row count is next_seq - reserved_seq (one sequence number per row). */
#define GF_RESERVED_ROWS 2

/* Reserve up to n records of payload len that are contiguous in the ring: the
 * first may follow a padding record at the wrap; the others stop at the wrap
 * point and at the first that does not fit (room is checked against the head
 * as prod_place does, a head read from shared memory validated by gf_rc_head_ok).
 * Record headers are written now (gf_rc_place: length, type, seq); the payloads are at
 * *payload_off + i * gf_record_size(len), i < *got, all inside the data area.
 * Nothing is visible until gf_commit_rows; gf_abort drops them. */
static int gf_reserve_rows_unlocked(gf_producer *p, uint64_t n, uint64_t len, uint64_t now_ns, uint64_t *payload_off,
                                    uint64_t *got) {
    *got = 0;
    if (!p->hdr) return GF_E_ARG;
    if (p->reserved) return GF_E_CLAIMED;
    int rc = gf_lease_status(p->lease_state, p->lease_deadline, now_ns);
    if (rc) return rc;
    rc = prod_owner(p);
    if (rc) return rc;
    if (len == 0 || n == 0) return GF_E_ARG;
    if (len > p->max_item) return GF_E_TOO_LARGE;
    uint64_t idx0;
    rc = prod_place(p, len, &idx0);
    if (rc == GF_FULL) return full_reason(p);
    if (rc) return rc;
    uint64_t rs = rec_size(len);
    uint64_t first = p->claim; /* the first row's record (after any padding) */
    uint64_t first_seq = p->next_seq - 1;
    p->claim += rs;
    uint64_t k = 1;
    while (k < n) {
        uint64_t idx = p->claim & p->mask;
        if (idx == 0 || idx + rs > p->capacity) break; /* contiguous rows only */
        int room = prod_room(p, rs);
        if (room <= 0) break; /* full (or a bad head, which the next call reports) */
        gf_rc_place(p, p->data, len, 0); /* the row's header, its sequence number (no padding here) */
        p->claim += rs;
        k++;
    }
    p->claim = first; /* what commit publishes is decided there */
    p->reserved = GF_RESERVED_ROWS;
    p->reserved_at = first;
    p->reserved_len = len;
    p->reserved_seq = first_seq;
    *payload_off = idx0 + GF_RECORD_HEADER_SIZE;
    *got = k;
    return GF_OK;
}

/* Publish the first k rows of a gf_reserve_rows reservation (the others are
 * dropped: their space and sequence numbers are reused). Everything it uses is
 * the producer's own state, nothing read back from shared memory. */
static int gf_commit_rows_unlocked(gf_producer *p, uint64_t k, uint64_t *first_seq) {
    if (!p->hdr || p->reserved != GF_RESERVED_ROWS) return GF_E_ARG;
    uint64_t rows = p->next_seq - p->reserved_seq;
    if (k == 0 || k > rows) return GF_E_ARG;
    uint64_t seq = p->reserved_seq;
    p->claim = p->reserved_at + k * rec_size(p->reserved_len);
    p->next_seq = seq + k;
    p->reserved = 0;
    int rc = prod_publish(p);
    if (rc) return rc;
    *first_seq = seq;
    return GF_OK;
}

int gf_reserve_rows(gf_producer *p, uint64_t n, uint64_t len, uint64_t now_ns, uint64_t *payload_off, uint64_t *got) {
    gf_lock(&p->lock);
    int rc = gf_reserve_rows_unlocked(p, n, len, now_ns, payload_off, got);
    gf_unlock(&p->lock);
    return rc;
}

int gf_commit_rows(gf_producer *p, uint64_t k, uint64_t *first_seq) {
    gf_lock(&p->lock);
    int rc = gf_commit_rows_unlocked(p, k, first_seq);
    gf_unlock(&p->lock);
    return rc;
}
