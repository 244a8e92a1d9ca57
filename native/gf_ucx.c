/* grafos_fabric._ucx: one-sided operations over UCX (libucp), one C call each.
 *
 * Every operation is post + wait + free inside one call, so Python crosses
 * into C once per operation and cffi releases the GIL for the whole wait.
 * The wait drives the worker itself (ucp_worker_progress) and stops on:
 *   - completion                      -> GFU_OK
 *   - the endpoint's error callback   -> GFU_DISCONNECTED
 *   - the caller's deadline           -> GFU_TIMEOUT
 * UCX never reports a stopped peer or a dead link, and with error handling
 * mode NONE (the only mode whose atomics work on 1.13 and >= 1.16 alike) a
 * request in flight to a dead peer never completes by itself. So on a failure
 * the endpoint is force-closed, which completes (cancels) what is still in
 * flight, before the call returns: no buffer of the caller is touched by UCX
 * after the call has returned.
 *
 * Threading: a worker is created SERIALIZED and every use of it (progress,
 * operations, connects, closes) holds the context's mutex. A busy progress
 * thread drops the mutex and yields whenever another thread is waiting for it.
 *
 * Only opaque handles and plain integers cross to Python (gf_ucx_api.h):
 * UCX's structs and enums stay here, so the same source builds against
 * UCX 1.13 (Debian 12) and 1.22 (PyPI libucx-cu12).
 */
#define _GNU_SOURCE
#include "gf_ucx.h"

#include <arpa/inet.h>
#include <endian.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <ucp/api/ucp.h>

/* After a force-close, what was in flight is given until it completes, or
 * until the worker has nothing left to do (GFU_SETTLE_IDLE passes in a row
 * that progressed nothing), or GFU_CLOSE_GRACE seconds, whichever comes
 * first. Measured on 1.13 (tcp, error mode NONE): an operation to a killed or
 * stopped peer never completes, not even after the force-close, and every
 * pass after it is empty (~220,000 empty passes in 5 ms), so a wait by time
 * alone added the whole grace, 5 ms, to every kill's detection. What such a
 * request may still point at is never freed (see gfu_ep.slot), and its
 * endpoint's connection is gone, so nothing arrives. A polite close (a flush
 * that waits for the peer) is given the grace by time only. */
#define GFU_CLOSE_GRACE 0.005
#define GFU_SETTLE_IDLE 64

struct gfu_ctx {
    ucp_context_h context;
    ucp_worker_h worker;
    pthread_mutex_t mu;
    atomic_int waiters;
    atomic_int stop;
    int wakeup;
    int efd;
};

/* A publication posted by gfu_publish_post and not yet waited for (gfu_publish_wait): the
 * requests of its sequence word's put, of its tail CAS and of its read of the head word, and
 * their operands (compare, swap/old, sequence word, head) on the heap: abandoned (leaked) when
 * a request never completes. */
typedef struct gfu_pub {
    int busy;
    int n;
    ucs_status_ptr_t reqs[3];
    uint64_t *ops;
} gfu_pub;

struct gfu_ep {
    gfu_ctx *ctx;
    ucp_ep_h ep;
    atomic_int failed;       /* ucs_status_t of the error callback, 0 while healthy */
    int abandoned;           /* the last request was freed while still in flight */
    uint64_t *slot;          /* GFU_SLOT_WORDS operand/reply words: on the heap; abandoned (leaked, 32 bytes)
                                when an operation failed without completing, so UCX can never write into
                                freed memory */
    gfu_pub pubs[GFU_PUB_SLOTS]; /* publications in flight (write-behind); settled by gfu_ep_free */
    char err[160];
};

struct gfu_mem {
    gfu_ctx *ctx;
    ucp_mem_h memh;
};

struct gfu_rkey {
    gfu_ep *ep;
    ucp_rkey_h rkey;
};

#define GFU_SLOT_WORDS 4 /* CAS compare + swap/old, the published sequence word, the head word read */

#define GFU_BACKLOG 256
struct gfu_listener {
    gfu_ctx *ctx;
    ucp_listener_h listener;
    gfu_ep *accepted[GFU_BACKLOG]; /* accepted endpoints not yet popped by Python */
    char peers[GFU_BACKLOG][64];
    int head, count;
    int dropped;
};

const char *gfu_version(void) {
    static char buf[32];
    unsigned major, minor, release;
    ucp_get_version(&major, &minor, &release);
    snprintf(buf, sizeof buf, "%u.%u.%u", major, minor, release);
    return buf;
}

int gfu_abi_version(void) { return GFU_ABI_VERSION; }

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static void ctx_lock(gfu_ctx *c) {
    atomic_fetch_add_explicit(&c->waiters, 1, memory_order_relaxed);
    pthread_mutex_lock(&c->mu);
    atomic_fetch_sub_explicit(&c->waiters, 1, memory_order_relaxed);
}

static void ctx_unlock(gfu_ctx *c) { pthread_mutex_unlock(&c->mu); }

static void set_err(char *err, size_t errlen, const char *what, ucs_status_t st) {
    if (err && errlen) snprintf(err, errlen, "%s: %s", what, ucs_status_string(st));
}

/* ------------------------------------------------------------------ context */

int gfu_ctx_create(const char *config, int wakeup, gfu_ctx **out, char *err, size_t errlen) {
    *out = NULL;
    gfu_ctx *c = calloc(1, sizeof *c);
    if (!c) return GFU_ERROR;
    pthread_mutex_init(&c->mu, NULL);
    c->efd = -1;
    c->wakeup = wakeup;
    ucp_config_t *cfg;
    ucs_status_t st = ucp_config_read(NULL, NULL, &cfg);
    if (st != UCS_OK) { set_err(err, errlen, "ucp_config_read", st); free(c); return GFU_ERROR; }
    /* config: "NAME=value;NAME=value" (names without the UCX_ prefix) */
    if (config && *config) {
        char *dup = strdup(config), *save = NULL;
        for (char *kv = strtok_r(dup, ";", &save); kv; kv = strtok_r(NULL, ";", &save)) {
            char *eq = strchr(kv, '=');
            if (!eq) continue;
            *eq = 0;
            st = ucp_config_modify(cfg, kv, eq + 1);
            if (st != UCS_OK) {
                if (err && errlen) snprintf(err, errlen, "UCX setting %s=%s: %s", kv, eq + 1, ucs_status_string(st));
                free(dup); ucp_config_release(cfg); free(c); return GFU_ERROR;
            }
        }
        free(dup);
    }
    ucp_params_t p;
    memset(&p, 0, sizeof p);
    p.field_mask = UCP_PARAM_FIELD_FEATURES;
    p.features = UCP_FEATURE_RMA | UCP_FEATURE_AMO64 | (wakeup ? UCP_FEATURE_WAKEUP : 0);
    st = ucp_init(&p, cfg, &c->context);
    ucp_config_release(cfg);
    if (st != UCS_OK) { set_err(err, errlen, "ucp_init", st); free(c); return GFU_ERROR; }
    ucp_worker_params_t wp;
    memset(&wp, 0, sizeof wp);
    wp.field_mask = UCP_WORKER_PARAM_FIELD_THREAD_MODE;
    wp.thread_mode = UCS_THREAD_MODE_SERIALIZED;
    st = ucp_worker_create(c->context, &wp, &c->worker);
    if (st != UCS_OK) { set_err(err, errlen, "ucp_worker_create", st); ucp_cleanup(c->context); free(c); return GFU_ERROR; }
    if (wakeup) {
        st = ucp_worker_get_efd(c->worker, &c->efd);
        if (st != UCS_OK) {
            set_err(err, errlen, "ucp_worker_get_efd", st);
            ucp_worker_destroy(c->worker); ucp_cleanup(c->context); free(c); return GFU_UNSUPPORTED;
        }
    }
    *out = c;
    return GFU_OK;
}

void gfu_ctx_destroy(gfu_ctx *c) {
    if (!c) return;
    ucp_worker_destroy(c->worker);
    ucp_cleanup(c->context);
    pthread_mutex_destroy(&c->mu);
    free(c);
}

int gfu_progress(gfu_ctx *c) {
    ctx_lock(c);
    int n = (int)ucp_worker_progress(c->worker);
    ctx_unlock(c);
    return n;
}

void gfu_stop_progress(gfu_ctx *c) { atomic_store(&c->stop, 1); }

/* The node's progress loop: returns when gfu_stop_progress() is called.
 * Busy mode polls the worker without pause (lowest latency, one core);
 * event mode arms the worker and sleeps in poll() on its fd (no idle CPU). */
int gfu_run_progress(gfu_ctx *c, int event_mode) {
    if (event_mode && c->efd < 0) return GFU_UNSUPPORTED;
    atomic_store(&c->stop, 0);
    while (!atomic_load_explicit(&c->stop, memory_order_relaxed)) {
        ctx_lock(c);
        for (int i = 0; i < 64; i++) {
            if (!ucp_worker_progress(c->worker) && event_mode) break;
        }
        if (event_mode) {
            ucs_status_t st = ucp_worker_arm(c->worker);
            ctx_unlock(c);
            if (st == UCS_OK) {
                struct pollfd pfd = {.fd = c->efd, .events = POLLIN};
                poll(&pfd, 1, 20); /* wakes on traffic; 20 ms bounds the stop latency */
            }
            continue;
        }
        ctx_unlock(c);
        if (atomic_load_explicit(&c->waiters, memory_order_relaxed)) sched_yield();
    }
    return GFU_OK;
}

/* ------------------------------------------------------------ progress group */

/* One thread progressing many workers (the node: one worker per client
 * session, so that fencing a session is destroying its worker). */
#define GFU_GROUP_MAX 1024
struct gfu_group {
    pthread_mutex_t mu;
    gfu_ctx *members[GFU_GROUP_MAX];
    int count;
    atomic_int waiters;
    atomic_int stop;
};

int gfu_group_create(gfu_group **out) {
    gfu_group *g = calloc(1, sizeof *g);
    if (!g) return GFU_ERROR;
    pthread_mutex_init(&g->mu, NULL);
    *out = g;
    return GFU_OK;
}

static void group_lock(gfu_group *g) {
    atomic_fetch_add_explicit(&g->waiters, 1, memory_order_relaxed);
    pthread_mutex_lock(&g->mu);
    atomic_fetch_sub_explicit(&g->waiters, 1, memory_order_relaxed);
}

int gfu_group_add(gfu_group *g, gfu_ctx *c) {
    group_lock(g);
    int rc = GFU_ERROR;
    if (g->count < GFU_GROUP_MAX) { g->members[g->count++] = c; rc = GFU_OK; }
    pthread_mutex_unlock(&g->mu);
    return rc;
}

/* After this returns, the runner no longer touches c (it may be destroyed). */
void gfu_group_remove(gfu_group *g, gfu_ctx *c) {
    group_lock(g);
    for (int i = 0; i < g->count; i++)
        if (g->members[i] == c) { g->members[i] = g->members[--g->count]; break; }
    pthread_mutex_unlock(&g->mu);
}

void gfu_group_stop(gfu_group *g) { atomic_store(&g->stop, 1); }

void gfu_group_destroy(gfu_group *g) {
    if (!g) return;
    pthread_mutex_destroy(&g->mu);
    free(g);
}

int gfu_group_run(gfu_group *g, int event_mode) {
    struct pollfd pfds[GFU_GROUP_MAX];
    atomic_store(&g->stop, 0);
    while (!atomic_load_explicit(&g->stop, memory_order_relaxed)) {
        int nfds = 0, busy = 0;
        group_lock(g);
        for (int i = 0; i < g->count; i++) {
            gfu_ctx *c = g->members[i];
            ctx_lock(c);
            for (int k = 0; k < 16 && ucp_worker_progress(c->worker); k++) busy = 1;
            if (event_mode && c->efd >= 0) {
                ucs_status_t st = ucp_worker_arm(c->worker);
                if (st == UCS_OK) pfds[nfds++] = (struct pollfd){.fd = c->efd, .events = POLLIN};
                else busy = 1;
            }
            if (atomic_load_explicit(&c->waiters, memory_order_relaxed)) busy = 2;
            ctx_unlock(c);
        }
        pthread_mutex_unlock(&g->mu);
        if (event_mode && !busy) poll(pfds, (nfds_t)nfds, 20); /* 20 ms bounds stop and membership latency */
        else if (busy == 2 || atomic_load_explicit(&g->waiters, memory_order_relaxed)) sched_yield();
    }
    return GFU_OK;
}

int gfu_worker_address(gfu_ctx *c, uint8_t *buf, size_t cap, size_t *len) {
    ucp_address_t *addr;
    size_t n;
    ctx_lock(c);
    ucs_status_t st = ucp_worker_get_address(c->worker, &addr, &n);
    if (st != UCS_OK) { ctx_unlock(c); return GFU_ERROR; }
    *len = n;
    int rc = GFU_OK;
    if (n <= cap) memcpy(buf, addr, n);
    else rc = GFU_ERROR;
    ucp_worker_release_address(c->worker, addr);
    ctx_unlock(c);
    return rc;
}

/* ---------------------------------------------------------------- endpoints */

static void ep_err_cb(void *arg, ucp_ep_h ep, ucs_status_t status) {
    gfu_ep *e = arg;
    int expected = 0;
    if (atomic_compare_exchange_strong(&e->failed, &expected, (int)status))
        snprintf(e->err, sizeof e->err, "endpoint error: %s", ucs_status_string(status));
}

static void fill_ep_errh(ucp_ep_params_t *p, gfu_ep *e) {
    p->field_mask |= UCP_EP_PARAM_FIELD_ERR_HANDLER | UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE;
    p->err_mode = UCP_ERR_HANDLING_MODE_NONE;
    p->err_handler.cb = ep_err_cb;
    p->err_handler.arg = e;
}

/* Wait for a request (called with the lock held). On failure or deadline the
 * endpoint is force-closed, which cancels what is in flight; the request is
 * waited for (bounded) and freed before returning. */
static int wait_req(gfu_ep *e, ucs_status_ptr_t req, double deadline, ucs_status_t *out_st);

/* Progress until req completes, or (until_idle) GFU_SETTLE_IDLE passes in a row did nothing, or
 * GFU_CLOSE_GRACE seconds passed (see GFU_CLOSE_GRACE). Returns whether req completed. */
static int settle_locked(ucp_worker_h w, void *req, int until_idle) {
    double until = now_s() + GFU_CLOSE_GRACE;
    unsigned idle = 0;
    while (ucp_request_check_status(req) == UCS_INPROGRESS) {
        if (ucp_worker_progress(w)) idle = 0;
        else if (until_idle && ++idle >= GFU_SETTLE_IDLE) break;
        if ((idle & 7) == 0 && now_s() >= until) break;
    }
    return ucp_request_check_status(req) != UCS_INPROGRESS;
}

static void close_locked(gfu_ep *e, int force) {
    if (!e->ep) return;
    ucp_request_param_t rp;
    memset(&rp, 0, sizeof rp);
    rp.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS;
    rp.flags = force ? UCP_EP_CLOSE_FLAG_FORCE : 0;
    ucs_status_ptr_t req = ucp_ep_close_nbx(e->ep, &rp);
    e->ep = NULL;
    if (req == NULL || UCS_PTR_IS_ERR(req)) return;
    settle_locked(e->ctx->worker, req, force);
    ucp_request_free(req);
}

static void fail_ep(gfu_ep *e, ucs_status_t why, const char *what) {
    int expected = 0;
    if (atomic_compare_exchange_strong(&e->failed, &expected, (int)why))
        snprintf(e->err, sizeof e->err, "%s", what);
}

static int wait_req(gfu_ep *e, ucs_status_ptr_t req, double deadline, ucs_status_t *out_st) {
    *out_st = UCS_OK;
    e->abandoned = 0;
    if (req == NULL) return GFU_OK;
    if (UCS_PTR_IS_ERR(req)) {
        *out_st = UCS_PTR_STATUS(req);
        fail_ep(e, *out_st, ucs_status_string(*out_st));
        close_locked(e, 1);
        return GFU_DISCONNECTED;
    }
    ucp_worker_h w = e->ctx->worker;
    unsigned spins = 0;
    int rc = GFU_OK;
    for (;;) {
        ucs_status_t st = ucp_request_check_status(req);
        if (st != UCS_INPROGRESS) {
            *out_st = st;
            if (st != UCS_OK) {
                fail_ep(e, st, ucs_status_string(st));
                rc = GFU_DISCONNECTED;
            }
            break;
        }
        if (atomic_load_explicit(&e->failed, memory_order_relaxed)) { rc = GFU_DISCONNECTED; break; }
        ucp_worker_progress(w);
        /* past ~50 us of spinning, let the peer run on an oversubscribed machine (a node
         * on the same cores needs the CPU to answer) */
        if (spins > 4096 && (spins & 15) == 0) sched_yield();
        if ((++spins & 15) == 0 && now_s() >= deadline) {
            fail_ep(e, UCS_ERR_TIMED_OUT, "operation timed out (the peer did not answer before the deadline)");
            rc = GFU_TIMEOUT;
            break;
        }
    }
    if (rc != GFU_OK) {
        close_locked(e, 1);
        /* the force-close may complete the request with an error: until it does or nothing is left to do */
        e->abandoned = !settle_locked(w, req, 1);
    }
    ucp_request_free(req);
    return rc;
}

static int flush_locked(gfu_ep *e, double deadline) {
    ucp_request_param_t rp;
    memset(&rp, 0, sizeof rp);
    ucs_status_t st;
    return wait_req(e, ucp_ep_flush_nbx(e->ep, &rp), deadline, &st);
}

static int connect_common(gfu_ctx *c, ucp_ep_params_t *p, gfu_ep *e, double timeout, gfu_ep **out, char *err,
                          size_t errlen) {
    e->slot = calloc(GFU_SLOT_WORDS, sizeof(uint64_t));
    if (!e->slot) { free(e); return GFU_ERROR; }
    fill_ep_errh(p, e);
    ctx_lock(c);
    ucs_status_t st = ucp_ep_create(c->worker, p, &e->ep);
    if (st != UCS_OK) {
        ctx_unlock(c);
        set_err(err, errlen, "ucp_ep_create", st);
        free(e->slot);
        free(e);
        return GFU_DISCONNECTED;
    }
    /* wire-up: flush before anything else (1.22 asserts on an rkey unpacked before it) */
    int rc = flush_locked(e, now_s() + timeout);
    ctx_unlock(c);
    if (rc != GFU_OK) {
        if (err && errlen) snprintf(err, errlen, "connect failed: %s", e->err);
        free(e->slot); /* a flush never points at it */
        free(e);
        return rc;
    }
    *out = e;
    return GFU_OK;
}

/* ip:port as a sockaddr_in; GFU_ERROR with a message when ip is not IPv4 text. */
static int parse_ipv4(const char *ip, uint16_t port, struct sockaddr_in *sin, char *err, size_t errlen) {
    memset(sin, 0, sizeof *sin);
    sin->sin_family = AF_INET;
    sin->sin_port = htons(port);
    if (inet_pton(AF_INET, ip, &sin->sin_addr) != 1) {
        if (err && errlen) snprintf(err, errlen, "not an IPv4 address: %s", ip);
        return GFU_ERROR;
    }
    return GFU_OK;
}

int gfu_connect_sockaddr(gfu_ctx *c, const char *ip, uint16_t port, double timeout, gfu_ep **out, char *err,
                         size_t errlen) {
    *out = NULL;
    struct sockaddr_in sin;
    if (parse_ipv4(ip, port, &sin, err, errlen) != GFU_OK) return GFU_ERROR;
    gfu_ep *e = calloc(1, sizeof *e);
    if (!e) return GFU_ERROR;
    e->ctx = c;
    ucp_ep_params_t p;
    memset(&p, 0, sizeof p);
    p.field_mask = UCP_EP_PARAM_FIELD_FLAGS | UCP_EP_PARAM_FIELD_SOCK_ADDR;
    p.flags = UCP_EP_PARAMS_FLAGS_CLIENT_SERVER;
    p.sockaddr.addr = (const struct sockaddr *)&sin;
    p.sockaddr.addrlen = sizeof sin;
    return connect_common(c, &p, e, timeout, out, err, errlen);
}

int gfu_connect_worker(gfu_ctx *c, const uint8_t *addr, size_t len, double timeout, gfu_ep **out, char *err,
                       size_t errlen) {
    *out = NULL;
    (void)len;
    gfu_ep *e = calloc(1, sizeof *e);
    if (!e) return GFU_ERROR;
    e->ctx = c;
    ucp_ep_params_t p;
    memset(&p, 0, sizeof p);
    p.field_mask = UCP_EP_PARAM_FIELD_REMOTE_ADDRESS;
    p.address = (const ucp_address_t *)addr;
    return connect_common(c, &p, e, timeout, out, err, errlen);
}

static void format_sockaddr(const struct sockaddr_storage *ss, char *buf, size_t len) {
    char host[INET6_ADDRSTRLEN] = "?";
    unsigned port = 0;
    if (ss->ss_family == AF_INET) {
        const struct sockaddr_in *s = (const struct sockaddr_in *)ss;
        inet_ntop(AF_INET, &s->sin_addr, host, sizeof host);
        port = ntohs(s->sin_port);
    } else if (ss->ss_family == AF_INET6) {
        const struct sockaddr_in6 *s = (const struct sockaddr_in6 *)ss;
        inet_ntop(AF_INET6, &s->sin6_addr, host, sizeof host);
        port = ntohs(s->sin6_port);
    }
    snprintf(buf, len, "%s:%u", host, port);
}

int gfu_ep_local_addr(gfu_ep *e, char *buf, size_t len) {
    if (!e->ep) return GFU_CLOSED;
    ucp_ep_attr_t a;
    memset(&a, 0, sizeof a);
    a.field_mask = UCP_EP_ATTR_FIELD_LOCAL_SOCKADDR;
    ctx_lock(e->ctx);
    ucs_status_t st = ucp_ep_query(e->ep, &a);
    ctx_unlock(e->ctx);
    if (st != UCS_OK) return GFU_UNSUPPORTED;
    format_sockaddr(&a.local_sockaddr, buf, len);
    return GFU_OK;
}

int gfu_ep_failed(gfu_ep *e) { return e->ep == NULL || atomic_load(&e->failed) != 0; }

const char *gfu_ep_error(gfu_ep *e) { return e->err[0] ? e->err : (e->ep ? "" : "endpoint closed"); }

void gfu_ep_close(gfu_ep *e, int force) {
    if (!e) return;
    ctx_lock(e->ctx);
    if (e->ep && !force) {
        /* a polite close flushes; a failed endpoint can only be force-closed */
        force = atomic_load(&e->failed) != 0;
    }
    close_locked(e, force);
    if (!e->err[0]) snprintf(e->err, sizeof e->err, "endpoint closed");
    ctx_unlock(e->ctx);
}

static void pub_settle_locked(gfu_ep *e, gfu_pub *pb);

void gfu_ep_free(gfu_ep *e) {
    if (!e) return;
    gfu_ep_close(e, 1);
    ctx_lock(e->ctx);
    for (int i = 0; i < GFU_PUB_SLOTS; i++) /* publications never waited for: settled, freed or abandoned */
        if (e->pubs[i].busy) pub_settle_locked(e, &e->pubs[i]);
    ctx_unlock(e->ctx);
    free(e->slot); /* NULL when abandoned */
    free(e);
}

/* ----------------------------------------------------------------- listener */

static void conn_cb(ucp_conn_request_h req, void *arg) {
    gfu_listener *l = arg;
    gfu_ctx *c = l->ctx;
    if (l->count >= GFU_BACKLOG) {
        l->dropped++;
        ucp_listener_reject(l->listener, req);
        return;
    }
    char peer[64] = "?";
    ucp_conn_request_attr_t ra;
    memset(&ra, 0, sizeof ra);
    ra.field_mask = UCP_CONN_REQUEST_ATTR_FIELD_CLIENT_ADDR;
    if (ucp_conn_request_query(req, &ra) == UCS_OK) format_sockaddr(&ra.client_address, peer, sizeof peer);
    gfu_ep *e = calloc(1, sizeof *e);
    if (e) e->slot = calloc(GFU_SLOT_WORDS, sizeof(uint64_t));
    if (!e || !e->slot) { free(e); ucp_listener_reject(l->listener, req); return; }
    e->ctx = c;
    ucp_ep_params_t p;
    memset(&p, 0, sizeof p);
    p.field_mask = UCP_EP_PARAM_FIELD_CONN_REQUEST;
    p.conn_request = req;
    fill_ep_errh(&p, e);
    if (ucp_ep_create(c->worker, &p, &e->ep) != UCS_OK) { free(e->slot); free(e); return; }
    int slot = (l->head + l->count) % GFU_BACKLOG;
    l->accepted[slot] = e;
    snprintf(l->peers[slot], sizeof l->peers[slot], "%s", peer);
    l->count++;
}

int gfu_listen(gfu_ctx *c, const char *ip, uint16_t port, gfu_listener **out, uint16_t *bound_port, char *err,
               size_t errlen) {
    *out = NULL;
    struct sockaddr_in sin;
    if (parse_ipv4(ip, port, &sin, err, errlen) != GFU_OK) return GFU_ERROR;
    gfu_listener *l = calloc(1, sizeof *l);
    if (!l) return GFU_ERROR;
    l->ctx = c;
    ucp_listener_params_t lp;
    memset(&lp, 0, sizeof lp);
    lp.field_mask = UCP_LISTENER_PARAM_FIELD_SOCK_ADDR | UCP_LISTENER_PARAM_FIELD_CONN_HANDLER;
    lp.sockaddr.addr = (const struct sockaddr *)&sin;
    lp.sockaddr.addrlen = sizeof sin;
    lp.conn_handler.cb = conn_cb;
    lp.conn_handler.arg = l;
    ctx_lock(c);
    ucs_status_t st = ucp_listener_create(c->worker, &lp, &l->listener);
    if (st != UCS_OK) {
        ctx_unlock(c);
        set_err(err, errlen, "ucp_listener_create", st);
        free(l);
        return GFU_ERROR;
    }
    ucp_listener_attr_t la;
    memset(&la, 0, sizeof la);
    la.field_mask = UCP_LISTENER_ATTR_FIELD_SOCKADDR;
    st = ucp_listener_query(l->listener, &la);
    ctx_unlock(c);
    *bound_port = port;
    if (st == UCS_OK && la.sockaddr.ss_family == AF_INET)
        *bound_port = ntohs(((struct sockaddr_in *)&la.sockaddr)->sin_port);
    *out = l;
    return GFU_OK;
}

int gfu_listener_pop(gfu_listener *l, gfu_ep **out, char *peer, size_t peerlen) {
    *out = NULL;
    ctx_lock(l->ctx);
    if (l->count == 0) { ctx_unlock(l->ctx); return GFU_TIMEOUT; }
    *out = l->accepted[l->head];
    snprintf(peer, peerlen, "%s", l->peers[l->head]);
    l->head = (l->head + 1) % GFU_BACKLOG;
    l->count--;
    ctx_unlock(l->ctx);
    return GFU_OK;
}

void gfu_listener_destroy(gfu_listener *l) {
    if (!l) return;
    ctx_lock(l->ctx);
    ucp_listener_destroy(l->listener);
    ctx_unlock(l->ctx);
    gfu_ep *e;
    char peer[64];
    while (gfu_listener_pop(l, &e, peer, sizeof peer) == GFU_OK) gfu_ep_free(e);
    free(l);
}

/* ------------------------------------------------------------ memory, rkeys */

int gfu_mem_map(gfu_ctx *c, void *addr, size_t len, gfu_mem **out, char *err, size_t errlen) {
    *out = NULL;
    gfu_mem *m = calloc(1, sizeof *m);
    if (!m) return GFU_ERROR;
    m->ctx = c;
    ucp_mem_map_params_t mp;
    memset(&mp, 0, sizeof mp);
    mp.field_mask = UCP_MEM_MAP_PARAM_FIELD_ADDRESS | UCP_MEM_MAP_PARAM_FIELD_LENGTH;
    mp.address = addr;
    mp.length = len;
    ucs_status_t st = ucp_mem_map(c->context, &mp, &m->memh);
    if (st != UCS_OK) { set_err(err, errlen, "ucp_mem_map", st); free(m); return GFU_ERROR; }
    *out = m;
    return GFU_OK;
}

int gfu_mem_unmap(gfu_mem *m) {
    if (!m) return GFU_OK;
    ucs_status_t st = ucp_mem_unmap(m->ctx->context, m->memh);
    free(m);
    return st == UCS_OK ? GFU_OK : GFU_ERROR;
}

int gfu_rkey_pack(gfu_mem *m, uint8_t *buf, size_t cap, size_t *len) {
    void *rb;
    size_t n;
    ucs_status_t st = ucp_rkey_pack(m->ctx->context, m->memh, &rb, &n);
    if (st != UCS_OK) return GFU_ERROR;
    *len = n;
    int rc = GFU_OK;
    if (n <= cap) memcpy(buf, rb, n);
    else rc = GFU_ERROR;
    ucp_rkey_buffer_release(rb);
    return rc;
}

int gfu_rkey_unpack(gfu_ep *e, const uint8_t *buf, size_t len, gfu_rkey **out) {
    *out = NULL;
    (void)len;
    if (!e->ep) return GFU_CLOSED;
    gfu_rkey *r = calloc(1, sizeof *r);
    if (!r) return GFU_ERROR;
    r->ep = e;
    ctx_lock(e->ctx);
    ucs_status_t st = ucp_ep_rkey_unpack(e->ep, buf, &r->rkey);
    ctx_unlock(e->ctx);
    if (st != UCS_OK) { free(r); return GFU_ERROR; }
    *out = r;
    return GFU_OK;
}

void gfu_rkey_destroy(gfu_rkey *r) {
    if (!r) return;
    ucp_rkey_destroy(r->rkey);
    free(r);
}

/* --------------------------------------------------------------- operations */

#define OP_BEGIN(e)                                        \
    ctx_lock((e)->ctx);                                    \
    if (!(e)->ep || !(e)->slot || atomic_load(&(e)->failed)) { \
        ctx_unlock((e)->ctx);                              \
        return GFU_DISCONNECTED;                           \
    }

int gfu_put(gfu_ep *e, gfu_rkey *r, const char *buf, size_t len, uint64_t raddr, int flush, double timeout) {
    double deadline = now_s() + timeout;
    OP_BEGIN(e);
    ucp_request_param_t rp;
    memset(&rp, 0, sizeof rp);
    ucs_status_t st;
    int rc = wait_req(e, ucp_put_nbx(e->ep, buf, len, raddr, r->rkey, &rp), deadline, &st);
    if (rc == GFU_OK && flush) rc = flush_locked(e, deadline);
    ctx_unlock(e->ctx);
    return rc;
}

int gfu_get(gfu_ep *e, gfu_rkey *r, char *buf, size_t len, uint64_t raddr, double timeout) {
    double deadline = now_s() + timeout;
    OP_BEGIN(e);
    ucp_request_param_t rp;
    memset(&rp, 0, sizeof rp);
    ucs_status_t st;
    int rc = wait_req(e, ucp_get_nbx(e->ep, buf, len, raddr, r->rkey, &rp), deadline, &st);
    ctx_unlock(e->ctx);
    return rc;
}

/* The ring's 64-bit words are little-endian on the wire (the node may be either). The operand
 * lives in the endpoint's heap slot, like an atomic's: abandoned (leaked) if the put or get never
 * completes, so UCX never writes into memory that was freed or reused. */
int gfu_load64(gfu_ep *e, gfu_rkey *r, uint64_t raddr, uint64_t *out, double timeout) {
    double deadline = now_s() + timeout;
    OP_BEGIN(e);
    uint64_t *slot = e->slot;
    ucp_request_param_t rp;
    memset(&rp, 0, sizeof rp);
    ucs_status_t st;
    int rc = wait_req(e, ucp_get_nbx(e->ep, slot, 8, raddr, r->rkey, &rp), deadline, &st);
    if (rc == GFU_OK) *out = le64toh(slot[0]);
    else if (e->abandoned) e->slot = NULL; /* leaked on purpose: UCX may still hold it */
    ctx_unlock(e->ctx);
    return rc;
}

int gfu_store64(gfu_ep *e, gfu_rkey *r, uint64_t raddr, uint64_t value, double timeout) {
    double deadline = now_s() + timeout;
    OP_BEGIN(e);
    uint64_t *slot = e->slot;
    slot[0] = htole64(value);
    ucp_request_param_t rp;
    memset(&rp, 0, sizeof rp);
    ucs_status_t st;
    int rc = wait_req(e, ucp_put_nbx(e->ep, slot, 8, raddr, r->rkey, &rp), deadline, &st);
    if (rc == GFU_OK) rc = flush_locked(e, deadline);
    else if (e->abandoned) e->slot = NULL; /* leaked on purpose: UCX may still hold it */
    ctx_unlock(e->ctx);
    return rc;
}

static int atomic_locked(gfu_ep *e, gfu_rkey *r, ucp_atomic_op_t op, uint64_t *value, uint64_t *reply,
                         uint64_t raddr, double deadline) {
    ucp_request_param_t rp;
    memset(&rp, 0, sizeof rp);
    rp.op_attr_mask = UCP_OP_ATTR_FIELD_DATATYPE | UCP_OP_ATTR_FIELD_REPLY_BUFFER;
    rp.datatype = ucp_dt_make_contig(8);
    rp.reply_buffer = reply;
    ucs_status_t st;
    return wait_req(e, ucp_atomic_op_nbx(e->ep, op, value, 1, raddr, r->rkey, &rp), deadline, &st);
}

int gfu_cas64(gfu_ep *e, gfu_rkey *r, uint64_t raddr, uint64_t expected, uint64_t desired, uint64_t *old,
              double timeout) {
    double deadline = now_s() + timeout;
    OP_BEGIN(e);
    /* CSWAP: buffer = compare value; reply_buffer = new value in, old value out */
    uint64_t *slot = e->slot;
    slot[0] = expected;
    slot[1] = desired;
    int rc = atomic_locked(e, r, UCP_ATOMIC_OP_CSWAP, &slot[0], &slot[1], raddr, deadline);
    if (rc == GFU_OK) *old = slot[1];
    else if (e->abandoned) e->slot = NULL; /* leaked on purpose: UCX may still hold it */
    ctx_unlock(e->ctx);
    return rc;
}

int gfu_faa64(gfu_ep *e, gfu_rkey *r, uint64_t raddr, uint64_t add, uint64_t *old, double timeout) {
    double deadline = now_s() + timeout;
    OP_BEGIN(e);
    uint64_t *slot = e->slot;
    slot[0] = add;
    slot[1] = 0;
    int rc = atomic_locked(e, r, UCP_ATOMIC_OP_ADD, &slot[0], &slot[1], raddr, deadline);
    if (rc == GFU_OK) *old = slot[1];
    else if (e->abandoned) e->slot = NULL; /* leaked on purpose: UCX may still hold it */
    ctx_unlock(e->ctx);
    return rc;
}

/* One publication of the one-sided ring producer (grafos_fabric/queue/_onesided_push.py): put the
 * records' spans (nspans triples in `spans`: local address, length, remote address; the framed
 * records, or headers from the staging image and payloads from the caller's buffers), put the
 * little-endian word `seq` at seq_raddr, then compare-and-swap the tail word, ordered after all of
 * them at the target. order 0: by ucp_worker_fence, UCP's documented guarantee that the operations
 * issued on an endpoint before the fence complete before those issued after it (OpenSHMEM's
 * shmem_fence is this call), so the CAS is posted at once and its reply is the only wait past the
 * puts' local completion. order 1: by a flush that is waited for before the CAS is posted
 * (store64's release, then cas64, as separate calls do).
 *
 * gfu_publish_post returns once the spans' puts completed locally (their buffers may be reused)
 * and leaves the sequence word's put and the CAS in flight in publication slot *slot_out of the
 * endpoint (order 1 does everything before it returns); gfu_publish_wait waits for them and
 * gives the tail word the CAS found. Every request posted is waited for, or, on a failure,
 * settled and freed; the first failure is returned (and the slot is free again). */
static void pub_settle_locked(gfu_ep *e, gfu_pub *pb) {
    int abandoned = 0;
    for (int i = 0; i < pb->n; i++) {
        ucs_status_ptr_t req = pb->reqs[i];
        if (req == NULL || UCS_PTR_IS_ERR(req)) continue;
        if (!settle_locked(e->ctx->worker, req, 1)) abandoned = 1;
        ucp_request_free(req);
    }
    if (!abandoned) free(pb->ops); /* else leaked on purpose: UCX may still write the reply */
    memset(pb, 0, sizeof *pb);
}

static int pub_wait_locked(gfu_ep *e, gfu_pub *pb, double deadline, uint64_t *old, uint64_t *head) {
    int rc = GFU_OK, abandoned = 0;
    ucs_status_t st;
    for (int i = 0; i < pb->n; i++) {
        int one = wait_req(e, pb->reqs[i], deadline, &st);
        abandoned |= e->abandoned;
        if (rc == GFU_OK) rc = one;
    }
    if (rc == GFU_OK && old) *old = pb->ops[1];
    if (rc == GFU_OK && head) *head = le64toh(pb->ops[3]);
    if (!abandoned) free(pb->ops);
    memset(pb, 0, sizeof *pb);
    return rc;
}

/* The head word (head_raddr, when want_head) is read after the CAS was posted: the consumer's
 * position as of then, which only grows, so the producer may take it as its head cache. */
static void post_head_read(gfu_ep *e, gfu_rkey *r, gfu_pub *pb, uint64_t head_raddr) {
    ucp_request_param_t gp;
    memset(&gp, 0, sizeof gp);
    pb->reqs[pb->n++] = ucp_get_nbx(e->ep, &pb->ops[3], 8, head_raddr, r->rkey, &gp);
}

/* Post the publication's tail CAS (operands in pb->ops[0..1], the old word back into ops[1]),
 * then, when asked, its read of the head word. */
static void post_cas(gfu_ep *e, gfu_rkey *r, gfu_pub *pb, uint64_t tail_raddr, int want_head, uint64_t head_raddr) {
    ucp_request_param_t ap;
    memset(&ap, 0, sizeof ap);
    ap.op_attr_mask = UCP_OP_ATTR_FIELD_DATATYPE | UCP_OP_ATTR_FIELD_REPLY_BUFFER;
    ap.datatype = ucp_dt_make_contig(8);
    ap.reply_buffer = &pb->ops[1];
    pb->reqs[pb->n++] = ucp_atomic_op_nbx(e->ep, UCP_ATOMIC_OP_CSWAP, &pb->ops[0], 1, tail_raddr, r->rkey, &ap);
    if (want_head && !UCS_PTR_IS_ERR(pb->reqs[pb->n - 1])) post_head_read(e, r, pb, head_raddr);
}

int gfu_publish_post(gfu_ep *e, gfu_rkey *r, const uint64_t *spans, int nspans, uint64_t seq_raddr, uint64_t seq,
                     uint64_t tail_raddr, uint64_t expected, uint64_t desired, uint64_t head_raddr, int want_head,
                     int order, double timeout, int *slot_out) {
    if (nspans < 0 || nspans > GFU_PUBLISH_SPANS || (nspans && !spans) || !slot_out) return GFU_ERROR;
    double deadline = now_s() + timeout;
    OP_BEGIN(e);
    int k = 0;
    while (k < GFU_PUB_SLOTS && e->pubs[k].busy) k++;
    uint64_t *ops = k < GFU_PUB_SLOTS ? calloc(GFU_SLOT_WORDS, sizeof(uint64_t)) : NULL;
    if (!ops) {
        ctx_unlock(e->ctx);
        return GFU_ERROR; /* every slot in flight (the caller waits for one first), or no memory */
    }
    gfu_pub *pb = &e->pubs[k];
    pb->busy = 1;
    pb->ops = ops;
    ops[0] = expected; /* CSWAP: buffer = compare value; reply_buffer = new value in, old value out */
    ops[1] = desired;
    ops[2] = htole64(seq);
    ucp_request_param_t rp;
    memset(&rp, 0, sizeof rp);
    ucs_status_ptr_t reqs[GFU_PUBLISH_SPANS];
    int n = 0, rc = GFU_OK, posted_ok = 1;
    ucs_status_t st;
    for (int i = 0; i < nspans && posted_ok; i++) {
        const uint64_t *t = spans + 3 * i;
        if (!t[1]) continue;
        reqs[n] = ucp_put_nbx(e->ep, (const void *)(uintptr_t)t[0], (size_t)t[1], t[2], r->rkey, &rp);
        posted_ok = !UCS_PTR_IS_ERR(reqs[n++]);
    }
    if (posted_ok) {
        pb->reqs[pb->n] = ucp_put_nbx(e->ep, &ops[2], 8, seq_raddr, r->rkey, &rp);
        posted_ok = !UCS_PTR_IS_ERR(pb->reqs[pb->n++]);
    }
    int fenced = order == 0 && posted_ok && ucp_worker_fence(e->ctx->worker) == UCS_OK;
    if (fenced) post_cas(e, r, pb, tail_raddr, want_head, head_raddr);
    for (int i = 0; i < n; i++) { /* the spans: complete locally (wait_req on a failed endpoint settles) */
        int one = wait_req(e, reqs[i], deadline, &st);
        if (rc == GFU_OK) rc = one;
    }
    if (rc == GFU_OK && !fenced) { /* order 1 (or no fence): the sequence word, a flush, then the CAS, waited */
        rc = pub_wait_locked(e, pb, deadline, NULL, NULL);
        pb->busy = 1;
        pb->ops = ops = calloc(GFU_SLOT_WORDS, sizeof(uint64_t));
        if (!ops) rc = GFU_ERROR;
        if (rc == GFU_OK) rc = flush_locked(e, deadline);
        if (rc == GFU_OK) {
            ops[0] = expected;
            ops[1] = desired;
            post_cas(e, r, pb, tail_raddr, want_head, head_raddr);
        }
    }
    if (rc != GFU_OK) pub_wait_locked(e, pb, deadline, NULL, NULL); /* settles what is in flight, frees the slot */
    else *slot_out = k;
    ctx_unlock(e->ctx);
    return rc;
}

int gfu_publish_wait(gfu_ep *e, int slot, uint64_t *old, uint64_t *head, double timeout) {
    if (!e || slot < 0 || slot >= GFU_PUB_SLOTS || !old || !head) return GFU_ERROR;
    double deadline = now_s() + timeout;
    ctx_lock(e->ctx);
    gfu_pub *pb = &e->pubs[slot];
    if (!pb->busy) {
        ctx_unlock(e->ctx);
        return GFU_ERROR;
    }
    int rc = pub_wait_locked(e, pb, deadline, old, head);
    ctx_unlock(e->ctx);
    return rc;
}

int gfu_publish(gfu_ep *e, gfu_rkey *r, const uint64_t *spans, int nspans, uint64_t seq_raddr, uint64_t seq,
                uint64_t tail_raddr, uint64_t expected, uint64_t desired, uint64_t head_raddr, int want_head,
                uint64_t *old, uint64_t *head, int order, double timeout) {
    int slot = -1;
    int rc = gfu_publish_post(e, r, spans, nspans, seq_raddr, seq, tail_raddr, expected, desired, head_raddr,
                              want_head, order, timeout, &slot);
    if (rc != GFU_OK) return rc;
    return gfu_publish_wait(e, slot, old, head, timeout);
}

int gfu_flush(gfu_ep *e, double timeout) {
    double deadline = now_s() + timeout;
    OP_BEGIN(e);
    int rc = flush_locked(e, deadline);
    ctx_unlock(e->ctx);
    return rc;
}

/* A tight C loop of one operation, for the benchmark: per-operation latency
 * in microseconds into lat_us[0..iters). op: 0 put, 1 put+flush, 2 get,
 * 3 cas, 4 faa. The same post + wait path as the calls above. */
int gfu_bench(gfu_ep *e, gfu_rkey *r, int op, void *buf, size_t len, uint64_t raddr, int iters, double *lat_us) {
    uint64_t old = 0;
    for (int i = 0; i < iters; i++) {
        double t0 = now_s();
        int rc;
        switch (op) {
        case 0: rc = gfu_put(e, r, buf, len, raddr, 0, 10.0); break;
        case 1: rc = gfu_put(e, r, buf, len, raddr, 1, 10.0); break;
        case 2: rc = gfu_get(e, r, buf, len, raddr, 10.0); break;
        case 3: rc = gfu_cas64(e, r, raddr, old, old + 1, &old, 10.0); break;
        case 4: rc = gfu_faa64(e, r, raddr, 1, &old, 10.0); break;
        default: return GFU_ERROR;
        }
        if (rc != GFU_OK) return rc;
        lat_us[i] = (now_s() - t0) * 1e6;
    }
    return GFU_OK;
}
