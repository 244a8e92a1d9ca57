/* gf_ucx_api.h: everything grafos_fabric._ucx exposes (status codes, handle types, functions), once.
 *
 * Plain C declarations, no preprocessor lines: the C code sees it through
 * gf_ucx.h, and native/build_ucx.py hands the very same text to ffi.cdef, so
 * the C side and the cffi declarations cannot drift apart (as pyca does).
 * Only opaque handles and plain integers cross: UCX's own structs and enums
 * stay in gf_ucx.c, so one binding builds against UCX 1.13 and 1.22. Buffers
 * Python passes as bytes are `const char *` (cffi passes bytes only to char
 * pointers, without a copy). */

enum {
    GFU_OK = 0,
    GFU_DISCONNECTED = -1, /* endpoint error (peer gone, connection reset) */
    GFU_UNSUPPORTED = -5,
    GFU_TIMEOUT = -8,      /* deadline passed; the endpoint was force-closed */
    GFU_ERROR = -9,        /* a local failure (bad argument, out of memory, UCX refused) */
    GFU_CLOSED = -10,      /* the endpoint was closed before the call */
    GFU_ABI_VERSION = 3,
    GFU_PUBLISH_SPANS = 64, /* the most spans one gfu_publish puts */
    GFU_PUB_SLOTS = 16      /* publications in flight per endpoint (gfu_publish_post) */
};

typedef struct gfu_ctx gfu_ctx;
typedef struct gfu_ep gfu_ep;
typedef struct gfu_mem gfu_mem;
typedef struct gfu_rkey gfu_rkey;
typedef struct gfu_listener gfu_listener;
typedef struct gfu_group gfu_group;

const char *gfu_version(void);
int gfu_abi_version(void);

int gfu_ctx_create(const char *config, int wakeup, gfu_ctx **out, char *err, size_t errlen);
void gfu_ctx_destroy(gfu_ctx *ctx);
int gfu_progress(gfu_ctx *ctx);
int gfu_run_progress(gfu_ctx *ctx, int event_mode);
void gfu_stop_progress(gfu_ctx *ctx);
int gfu_group_create(gfu_group **out);
int gfu_group_add(gfu_group *g, gfu_ctx *ctx);
void gfu_group_remove(gfu_group *g, gfu_ctx *ctx);
int gfu_group_run(gfu_group *g, int event_mode);
void gfu_group_stop(gfu_group *g);
void gfu_group_destroy(gfu_group *g);
int gfu_worker_address(gfu_ctx *ctx, uint8_t *buf, size_t cap, size_t *len);

int gfu_listen(gfu_ctx *ctx, const char *ip, uint16_t port, gfu_listener **out, uint16_t *bound_port,
               char *err, size_t errlen);
int gfu_listener_pop(gfu_listener *l, gfu_ep **out, char *peer, size_t peerlen);
void gfu_listener_destroy(gfu_listener *l);

int gfu_connect_sockaddr(gfu_ctx *ctx, const char *ip, uint16_t port, double timeout, gfu_ep **out,
                         char *err, size_t errlen);
int gfu_connect_worker(gfu_ctx *ctx, const uint8_t *addr, size_t len, double timeout, gfu_ep **out,
                       char *err, size_t errlen);
int gfu_ep_local_addr(gfu_ep *ep, char *buf, size_t len);
int gfu_ep_failed(gfu_ep *ep);
const char *gfu_ep_error(gfu_ep *ep);
void gfu_ep_close(gfu_ep *ep, int force);
void gfu_ep_free(gfu_ep *ep);

int gfu_mem_map(gfu_ctx *ctx, void *addr, size_t len, gfu_mem **out, char *err, size_t errlen);
int gfu_mem_unmap(gfu_mem *mem);
int gfu_rkey_pack(gfu_mem *mem, uint8_t *buf, size_t cap, size_t *len);
int gfu_rkey_unpack(gfu_ep *ep, const uint8_t *buf, size_t len, gfu_rkey **out);
void gfu_rkey_destroy(gfu_rkey *rkey);

int gfu_put(gfu_ep *ep, gfu_rkey *rkey, const char *buf, size_t len, uint64_t raddr, int flush, double timeout);
int gfu_get(gfu_ep *ep, gfu_rkey *rkey, char *buf, size_t len, uint64_t raddr, double timeout);
int gfu_cas64(gfu_ep *ep, gfu_rkey *rkey, uint64_t raddr, uint64_t expected, uint64_t desired, uint64_t *old,
              double timeout);
int gfu_faa64(gfu_ep *ep, gfu_rkey *rkey, uint64_t raddr, uint64_t add, uint64_t *old, double timeout);
int gfu_load64(gfu_ep *ep, gfu_rkey *rkey, uint64_t raddr, uint64_t *out, double timeout);
int gfu_store64(gfu_ep *ep, gfu_rkey *rkey, uint64_t raddr, uint64_t value, double timeout);
int gfu_publish(gfu_ep *ep, gfu_rkey *rkey, const uint64_t *spans, int nspans, uint64_t seq_raddr, uint64_t seq,
                uint64_t tail_raddr, uint64_t expected, uint64_t desired, uint64_t head_raddr, int want_head,
                uint64_t *old, uint64_t *head, int order, double timeout);
int gfu_publish_post(gfu_ep *ep, gfu_rkey *rkey, const uint64_t *spans, int nspans, uint64_t seq_raddr,
                     uint64_t seq, uint64_t tail_raddr, uint64_t expected, uint64_t desired, uint64_t head_raddr,
                     int want_head, int order, double timeout, int *slot_out);
int gfu_publish_wait(gfu_ep *ep, int slot, uint64_t *old, uint64_t *head, double timeout);
int gfu_flush(gfu_ep *ep, double timeout);

int gfu_bench(gfu_ep *ep, gfu_rkey *rkey, int op, void *buf, size_t len, uint64_t raddr, int iters,
              double *lat_us);
