/* gf_native_api.h: every function grafos_fabric._native exposes, once.
 *
 * Prototype-only and plain C declarations (no preprocessor lines): the C
 * code sees it through gf_native.h, which includes it after the types it
 * needs, and native/build_native.py hands the very same text to ffi.cdef,
 * so the C prototypes and the cffi declarations cannot drift apart (as in
 * pyca/cryptography). Buffers that Python passes as bytes are `const char *`
 * (cffi passes bytes only to char pointers). Status codes: gf_native.h. */

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
/* acked only grows: 0, or GF_E_CORRUPT when the word kept changing */
int gf_ring_set_acked(void *ring, uint64_t seq);

/* Role init validates the ring's geometry against region_size (the bytes
 * mapped at `ring`), and the positions it starts from. */
int gf_producer_init(gf_producer *p, void *ring, uint64_t region_size, volatile uint64_t *lease_state,
                     volatile uint64_t *lease_deadline, uint64_t epoch, uint64_t id);
int gf_producer_close(gf_producer *p);
int gf_push(gf_producer *p, const char *buf, uint64_t len, uint64_t now_ns, uint64_t *seq_out);
int gf_push_rows(gf_producer *p, const void *base, uint64_t n, uint64_t row_stride, uint64_t len, uint64_t now_ns,
                 uint64_t *pushed);
int gf_push_concat(gf_producer *p, const char *base, const uint64_t *lens, uint64_t n, uint64_t now_ns,
                   uint64_t *pushed);
int gf_reserve(gf_producer *p, uint64_t len, uint64_t now_ns, uint64_t *payload_off);
int gf_commit(gf_producer *p, uint64_t len, uint64_t *seq_out);
int gf_abort(gf_producer *p);
int gf_wait_space(gf_producer *p, uint64_t len, uint64_t timeout_ns, uint32_t spin);
/* reserved rows (reserve_batch): up to n contiguous records of payload len,
 * published together (the first k of them) by gf_commit_rows; gf_abort drops them */
int gf_reserve_rows(gf_producer *p, uint64_t n, uint64_t len, uint64_t now_ns, uint64_t *payload_off, uint64_t *got);
int gf_commit_rows(gf_producer *p, uint64_t k, uint64_t *first_seq);

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

/* The ring core (gf_ring_core.h) for a caller that brings the shared words
 * itself: the one-sided path, whose region is reached with load64/cas64/
 * read_into/write. Pure functions over a role's state (a gf_producer or
 * gf_consumer whose hdr/data are unused) and a local image laid out like the
 * ring's data area; no I/O. */
uint64_t gf_ring_tag(uint64_t epoch);
int gf_ring_claim_verdict(uint64_t epoch, uint64_t epoch_now, uint64_t holder, int lock);
int gf_ring_claimed(uint64_t found, uint64_t id);
int gf_ring_reclaimable(uint64_t holder);
int gf_ring_seal_step(uint64_t tail_word, uint64_t *desired);
int gf_ring_epoch_step(uint64_t cur, uint64_t new_epoch);
uint64_t gf_ring_retag(uint64_t tail_word, uint64_t new_epoch);
int gf_ring_acked_step(uint64_t cur, uint64_t seq);
int gf_ring_build(void *header_image, uint64_t region_size, uint64_t capacity, uint64_t max_item,
                  uint64_t first_seq, uint64_t epoch, const char *dtype, uint32_t dtype_len, uint32_t flags);
int gf_ring_prod_start(gf_producer *p, uint64_t capacity, uint64_t max_item, uint64_t epoch, uint64_t tail_word,
                       uint64_t head, uint64_t next_seq);
int gf_ring_owns(const gf_producer *p, uint64_t tail_word);
int gf_ring_lost_tail(const gf_producer *p, uint64_t tail_word, uint64_t epoch_now);
int gf_ring_set_head(gf_producer *p, uint64_t head);
uint64_t gf_ring_need(const gf_producer *p, uint64_t len);
int gf_ring_room(const gf_producer *p, uint64_t need);
int gf_ring_frame(gf_producer *p, uint8_t *image, const char *src, const uint64_t *lens, uint64_t n,
                  uint64_t row_len, uint64_t row_stride, uint64_t *io);
int gf_ring_reserve_in(gf_producer *p, uint8_t *image, uint64_t len, uint64_t *payload_idx, uint64_t *pad_at);
int gf_ring_commit_in(gf_producer *p, uint8_t *image, uint64_t len, uint64_t *seq_out);
void gf_ring_abort_in(gf_producer *p);
uint64_t gf_ring_publish_expected(const gf_producer *p);
uint64_t gf_ring_publish_desired(const gf_producer *p);
int gf_ring_published(gf_producer *p, uint64_t found);
void gf_ring_rollback(gf_producer *p);
int gf_ring_cons_start(gf_consumer *c, uint64_t capacity, uint64_t max_item, uint64_t head, uint64_t tail_word,
                       uint64_t *pend_end, uint8_t *pend_done, uint64_t pend_cap);
int gf_ring_pend_push(gf_consumer *c, uint64_t end, uint64_t *token);
int gf_ring_release(gf_consumer *c, uint64_t token);
int gf_ring_set_tail(gf_consumer *c, uint64_t tail_word);
int gf_ring_take(gf_consumer *c, const uint8_t *image, uint64_t avail, uint64_t max_items, uint64_t *offs,
                 uint64_t *lens, uint64_t *seqs, uint64_t *n_io, uint64_t *uniform_io, uint64_t *need);

/* CRC32C (gf_crc.c; gf_crc.h declares the same for the C code that uses it),
 * fused with the copy into an aligned write buffer (slot records). */
uint32_t gf_crc32c_copy(uint8_t *dst, const uint8_t *src, uint64_t len, uint32_t crc);
uint32_t gf_crc32c(const uint8_t *buf, uint64_t len, uint32_t crc);
int gf_crc32c_impl(void);

/* One slot record, built and made durable in one native call (gf_crc.c; see gf_crc.h). */
int gf_aio_setup(uint32_t nr_events, uint64_t *ctx);
int gf_aio_destroy(uint64_t ctx);
int gf_slot_write(int fd, int64_t pos, uint8_t *buf, uint64_t nbytes, uint64_t block, const uint8_t *header,
                  const uint8_t *const *parts, const uint64_t *lens, uint32_t nparts, uint64_t aio_ctx,
                  uint64_t chunk, int dsync);
int gf_slot_write_gather(int fd, int64_t pos, const uint8_t *header, const uint8_t *const *parts,
                         const uint64_t *lens, uint32_t nparts, const uint8_t *zeros, uint64_t pad, int dsync);
int gf_slot_write_direct(int fd, int64_t pos, uint8_t *head, uint64_t head_len, uint64_t block, const uint8_t *data,
                         uint64_t data_len, uint8_t *tail, uint64_t aio_ctx, uint64_t chunk, int dsync);
void *gf_gate_new(void);
void gf_gate_shut(void *gate);
void gf_gate_free(void *gate);
int gf_slot_write_gated(uint64_t seq, void *gate, uint8_t *hdr, uint32_t slot, int fd, int64_t pos, uint8_t *buf,
                        uint64_t nbytes, uint64_t block, const uint8_t *header, const uint8_t *const *parts, const uint64_t *lens, uint32_t nparts,
                        uint64_t aio_ctx, uint64_t chunk, int dsync);
int gf_slot_write_gather_gated(uint64_t seq, void *gate, uint8_t *hdr, uint32_t slot, int fd, int64_t pos,
                               const uint8_t *header, const uint8_t *const *parts, const uint64_t *lens, uint32_t nparts, const uint8_t *zeros, uint64_t pad, int dsync);
int gf_slot_write_direct_gated(uint64_t seq, void *gate, uint8_t *hdr, uint32_t slot, int fd, int64_t pos,
                               uint8_t *head, uint64_t head_len, uint64_t block, const uint8_t *data, uint64_t data_len, uint8_t *tail, uint64_t aio_ctx,
                               uint64_t chunk, int dsync);
struct gf_lane;
uint64_t gf_gate_gen(void *gate);
void gf_gate_bump(void *gate);
int gf_lane_write(struct gf_lane *lane, uint64_t seq, uint32_t slot, uint64_t v0, uint64_t v1, int64_t deadline_ns);
void gf_lane_close(struct gf_lane *lane);
void gf_lane_point(struct gf_lane *lane, uint64_t hdr_len, const uint8_t *data, uint64_t data_len, uint64_t chunk);
