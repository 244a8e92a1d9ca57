/*
 * gf_item.c: grafos_fabric._item, the queue's single-item hot path as a small
 * CPython extension (a normal, non-abi3 build; the ring itself stays in the
 * cffi module grafos_fabric._native).
 *
 *   Item      one popped item. Exports its payload through the buffer protocol
 *             (read-only), so memoryview(item), np.asarray(item),
 *             np.frombuffer(item) and bytes(item) need no Python code. It
 *             counts its exports: the ring space is released when the item is
 *             released (release(), `with`, or garbage) AND its last export is
 *             gone, never before (bf_releasebuffer / tp_dealloc do it).
 *   Consumer  the consumer side of one FabricQueue handle: the single-pop
 *             prefetch (one native gf_pop_batch for up to PF_MAX records, then
 *             items handed out one by one after a lease check) and the item
 *             factory. Its state is only touched with the GIL held and no
 *             Python code runs between reading and updating it, so threads
 *             sharing a handle never see it half-updated.
 *   Producer  one native gf_push per push, no Python-level dispatch for bytes
 *             and contiguous buffers.
 *
 * The ring code is not duplicated here: grafos_fabric.queue hands the
 * addresses of the cffi module's gf_pop_batch / gf_release / gf_push to
 * bind() once, and the pointers are typed from gf_native.h, so a signature
 * change there fails this build instead of miscalling.
 *
 * Lifetime: an Item holds its Consumer, the Consumer holds the queue handle
 * (which holds the mapping and the native consumer state): views of an item
 * keep the mapping alive after `del queue; gc.collect()`.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <stdint.h>
#include <pthread.h>
#include <string.h>
#include <time.h>

#include "gf_native.h"

#define PF_MAX 64

static __typeof__(&gf_pop_batch) g_pop_batch;
static __typeof__(&gf_release) g_release;
static __typeof__(&gf_push) g_push;
static __typeof__(&gf_consumer_outstanding) g_outstanding;
static __typeof__(&gf_reserve) g_reserve;
static __typeof__(&gf_commit) g_commit;
static __typeof__(&gf_abort) g_abort;
static __typeof__(&gf_reserve_rows) g_reserve_rows;
static __typeof__(&gf_commit_rows) g_commit_rows;
static __typeof__(&gf_record_size) g_record_size;

static PyObject *g_frombuffer;   /* numpy.frombuffer */
static PyObject *g_released_exc; /* errors.FabricValueError: an item used after release */
static PyObject *g_finish_array; /* queue._finish_array(arr, dtype, copy) */
static PyObject *g_rows_view;    /* queue._rows_view(ring, offset, rows, length, stride, dtype) */
static PyObject *g_str_last_seq; /* "last_seq", interned */
static PyObject *g_corrupted_exc; /* errors.Corrupted: a payload that is not whole dtype elements */

/* Bumped in a child after fork(): the parent's consumers and producers (their
 * native state was copied with the process) must not release, pop or push
 * there: a release would move the parent's ring head from the child. */
static volatile unsigned long g_fork_gen;
static void after_fork_in_child(void) { g_fork_gen++; }

static inline uint64_t monotonic_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* ------------------------------------------------------------------ Consumer */

typedef struct {
    PyObject_HEAD
    PyObject *queue;      /* pins the mapping and the native consumer state */
    PyObject *keep;       /* whatever else must outlive the items (cdata) */
    gf_consumer *c;       /* NULL: items release through release_cb (one-sided queues) */
    PyObject *release_cb; /* callable(token), when c is NULL */
    PyObject *on_error;   /* callable(rc): raises the typed error */
    PyObject *on_lease;   /* callable(): the lease's own check (raises, or returns if live) */
    PyObject *on_closed;  /* callable(): after a native release while closed */
    PyObject *clock;      /* callable() -> ns, or None for CLOCK_MONOTONIC */
    PyObject *dtype;      /* what array() makes: the queue's dtype, or uint8 */
    PyObject *fmt;        /* PEP 3118 format of one element (bytes), or None: exports need no format */
    PyTypeObject *item_type;
    Py_ssize_t itemsize;
    char *data;
    volatile uint64_t *lease_state;
    volatile uint64_t *lease_deadline;
    uint64_t prefetch_bytes;
    int closed;
    uint32_t pf_i, pf_n;
    unsigned long fork_gen; /* g_fork_gen when made */
    unsigned long tid;      /* the first thread that popped (0: none yet) */
    int multi;              /* pops came from more than one thread */
    uint64_t pf_token;
    uint64_t offs[PF_MAX], lens[PF_MAX], seqs[PF_MAX];
} ConsumerObject;

typedef struct {
    PyObject_HEAD
    ConsumerObject *core;
    PyObject *batch;      /* the Batch this item belongs to (it owns the release), or NULL */
    PyObject *weakrefs;
    char *ptr;
    Py_ssize_t length;
    uint64_t seq;
    uint64_t offset;
    uint64_t token;
    Py_ssize_t exports;
    Py_ssize_t dims_b[2]; /* shape and stride of a byte export */
    Py_ssize_t dims_t[2]; /* ... and of a typed one */
    int pending;          /* the token is still to be released */
    int released;         /* release() was called: no new exports */
} ItemObject;

static PyTypeObject ItemType;
static PyTypeObject ConsumerType;

/* Release a token into the ring. Never raises: a finalizer calls it too. */
static void core_release(ConsumerObject *core, uint64_t token) {
    PyObject *et, *ev, *tb;
    PyErr_Fetch(&et, &ev, &tb);
    if (core->fork_gen != g_fork_gen) {
        /* a forked child: the native consumer is the parent's; nothing is released here */
    } else if (core->c) {
        g_release(core->c, token);
        if (core->closed && core->on_closed) {
            PyObject *r = PyObject_CallNoArgs(core->on_closed);
            if (!r) PyErr_WriteUnraisable(core->on_closed);
            Py_XDECREF(r);
        }
    } else if (core->release_cb) {
        PyObject *t = PyLong_FromUnsignedLongLong(token);
        PyObject *r = t ? PyObject_CallOneArg(core->release_cb, t) : NULL;
        if (!r) PyErr_WriteUnraisable(core->release_cb);
        Py_XDECREF(r);
        Py_XDECREF(t);
    }
    PyErr_Restore(et, ev, tb);
}

static PyObject *item_new_raw(ConsumerObject *core, PyTypeObject *tp, uint64_t token, uint64_t offset,
                              Py_ssize_t length, uint64_t seq, char *base, PyObject *batch) {
    ItemObject *it = (ItemObject *)tp->tp_alloc(tp, 0);
    if (!it) return NULL;
    Py_INCREF(core);
    it->core = core;
    Py_XINCREF(batch);
    it->batch = batch;
    it->ptr = base + offset;
    it->length = length;
    it->seq = seq;
    it->offset = offset;
    it->token = token;
    it->pending = batch == NULL;
    return (PyObject *)it;
}

/* Fast allocation of the exact type: no tp_alloc indirection, not GC-tracked. */
static inline PyObject *item_new_fast(ConsumerObject *core, uint64_t token, uint64_t offset, uint64_t length,
                                      uint64_t seq) {
    if (core->item_type != &ItemType)
        return item_new_raw(core, core->item_type, token, offset, (Py_ssize_t)length, seq, core->data, NULL);
    ItemObject *it = PyObject_New(ItemObject, &ItemType);
    if (!it) return NULL;
    Py_INCREF(core);
    it->core = core;
    it->batch = NULL;
    it->weakrefs = NULL;
    it->ptr = core->data + offset;
    it->length = (Py_ssize_t)length;
    it->seq = seq;
    it->offset = offset;
    it->token = token;
    it->exports = 0;
    it->pending = 1;
    it->released = 0;
    return (PyObject *)it;
}

static int call_error(ConsumerObject *core, PyObject *cb, int rc) {
    PyObject *r = PyObject_CallFunction(cb, "i", rc);
    if (!r) return -1;
    Py_DECREF(r);
    return 0;
}

static int clock_now(PyObject *clock, uint64_t *now) {
    if (clock == Py_None) {
        *now = 0;
        return 0;
    }
    PyObject *r = PyObject_CallNoArgs(clock);
    if (!r) return -1;
    *now = PyLong_AsUnsignedLongLong(r);
    Py_DECREF(r);
    return PyErr_Occurred() ? -1 : 0;
}

/* try_pop() -> Item | None */
static PyObject *consumer_try_pop(ConsumerObject *self, PyObject *unused) {
    if (!self->c) {
        PyErr_SetString(PyExc_TypeError, "this consumer releases through Python: no native pop");
        return NULL;
    }
    if (self->fork_gen != g_fork_gen) {
        if (call_error(self, self->on_error, GF_E_ARG) < 0) return NULL;
        Py_RETURN_NONE;
    }
    unsigned long tid = PyThread_get_thread_ident();
    if (tid != self->tid) {
        if (self->tid == 0) self->tid = tid;
        else self->multi = 1;
    }
    uint32_t i = self->pf_i;
    if (i < self->pf_n) {
        /* SYNC POINT: lease-state (the native pop that prefetched checked it; each hand-out checks again) */
        uint64_t st = __atomic_load_n(self->lease_state, __ATOMIC_ACQUIRE);
        uint64_t now;
        if (self->clock == Py_None) now = monotonic_ns();
        else if (clock_now(self->clock, &now) < 0) return NULL;
        if (st != GF_LEASE_ACTIVE || now >= __atomic_load_n(self->lease_deadline, __ATOMIC_ACQUIRE)) {
            PyObject *r = PyObject_CallNoArgs(self->on_lease);
            if (!r) return NULL;
            Py_DECREF(r);
            i = self->pf_i; /* the check ran Python code: read the state again */
            if (i >= self->pf_n) Py_RETURN_NONE;
        }
        self->pf_i = i + 1;
        return item_new_fast(self, self->pf_token + i, self->offs[i], self->lens[i], self->seqs[i]);
    }
    uint64_t now, n = 0, token = 0, uni = 0;
    if (clock_now(self->clock, &now) < 0) return NULL;
    int rc = g_pop_batch(self->c, PF_MAX, self->prefetch_bytes, 1, now, self->offs, self->lens, self->seqs, &n,
                         &token, &uni);
    if (rc == GF_OK && n > 0 && n <= PF_MAX) {
        self->pf_token = token;
        self->pf_n = (uint32_t)n;
        self->pf_i = 1;
        return item_new_fast(self, token, self->offs[0], self->lens[0], self->seqs[0]);
    }
    if (rc == GF_EMPTY) Py_RETURN_NONE;
    if (rc == GF_E_HELD && self->multi) Py_RETURN_NONE; /* other threads hold the oldest items */
    if (call_error(self, self->on_error, rc == GF_OK ? GF_E_CORRUPT : rc) < 0) return NULL;
    Py_RETURN_NONE;
}

/* item(token, offset, length, seq, base) -> Item: an item made by Python code
 * (one-sided pops), released through this consumer. */
static PyObject *consumer_item(ConsumerObject *self, PyObject *args) {
    unsigned long long token, offset, seq;
    Py_ssize_t length;
    unsigned long long base;
    if (!PyArg_ParseTuple(args, "KKnKK", &token, &offset, &length, &seq, &base)) return NULL;
    if (length < 0) {
        PyErr_SetString(PyExc_ValueError, "negative length");
        return NULL;
    }
    return item_new_raw(self, self->item_type, token, offset, length, seq, (char *)(uintptr_t)base, NULL);
}

/* batch_item(batch, offset, length, seq, base) -> Item of a batch: the batch
 * releases; each export pins the batch's span (batch._span()). */
static PyObject *consumer_batch_item(ConsumerObject *self, PyObject *args) {
    PyObject *batch;
    unsigned long long offset, seq, base;
    Py_ssize_t length;
    if (!PyArg_ParseTuple(args, "OKnKK", &batch, &offset, &length, &seq, &base)) return NULL;
    if (length < 0) {
        PyErr_SetString(PyExc_ValueError, "negative length");
        return NULL;
    }
    return item_new_raw(self, self->item_type, 0, offset, length, seq, (char *)(uintptr_t)base, batch);
}

/* prefetched() -> int: records taken from the ring but not handed out yet. */
static PyObject *consumer_prefetched(ConsumerObject *self, PyObject *unused) {
    return PyLong_FromUnsignedLong(self->pf_n - self->pf_i);
}

/* take_prefetched(k) -> (first_token, offsets, lengths, seqs) | None: hand out
 * up to k prefetched records at once (for pop_batch), in order. */
static PyObject *consumer_take_prefetched(ConsumerObject *self, PyObject *arg) {
    Py_ssize_t k = PyLong_AsSsize_t(arg);
    if (k == -1 && PyErr_Occurred()) return NULL;
    uint32_t i = self->pf_i, avail = self->pf_n - self->pf_i;
    if (avail == 0 || k <= 0) Py_RETURN_NONE;
    uint32_t m = (uint64_t)k < avail ? (uint32_t)k : avail;
    PyObject *o = PyList_New(m), *l = PyList_New(m), *s = PyList_New(m);
    if (!o || !l || !s) goto fail;
    for (uint32_t j = 0; j < m; j++) {
        PyObject *a = PyLong_FromUnsignedLongLong(self->offs[i + j]);
        PyObject *b = PyLong_FromUnsignedLongLong(self->lens[i + j]);
        PyObject *c = PyLong_FromUnsignedLongLong(self->seqs[i + j]);
        if (!a || !b || !c) {
            Py_XDECREF(a);
            Py_XDECREF(b);
            Py_XDECREF(c);
            goto fail;
        }
        PyList_SET_ITEM(o, j, a);
        PyList_SET_ITEM(l, j, b);
        PyList_SET_ITEM(s, j, c);
    }
    self->pf_i = i + m;
    return Py_BuildValue("KNNN", (unsigned long long)(self->pf_token + i), o, l, s);
fail:
    Py_XDECREF(o);
    Py_XDECREF(l);
    Py_XDECREF(s);
    return NULL;
}

/* note_thread(): a consumer call from this thread (pop_batch): notes whether calls
 * come from more than one thread (multi). */
static PyObject *consumer_note_thread(ConsumerObject *self, PyObject *unused) {
    unsigned long tid = PyThread_get_thread_ident();
    if (tid != self->tid) {
        if (self->tid == 0) self->tid = tid;
        else self->multi = 1;
    }
    Py_RETURN_NONE;
}

/* drop_prefetched(): forget what is prefetched (its tokens stay unreleased, so
 * head stays before those records and the next consumer reads them again). */
static PyObject *consumer_drop_prefetched(ConsumerObject *self, PyObject *unused) {
    self->pf_i = self->pf_n;
    Py_RETURN_NONE;
}

static int consumer_traverse(ConsumerObject *self, visitproc visit, void *arg) {
    Py_VISIT(self->queue);
    Py_VISIT(self->keep);
    Py_VISIT(self->release_cb);
    Py_VISIT(self->on_error);
    Py_VISIT(self->on_lease);
    Py_VISIT(self->on_closed);
    Py_VISIT(self->clock);
    Py_VISIT(self->dtype);
    Py_VISIT(self->fmt);
    Py_VISIT(self->item_type);
    return 0;
}

static int consumer_clear(ConsumerObject *self) {
    /* the native consumer state goes with the queue: nothing can release into it after this */
    self->c = NULL;
    Py_CLEAR(self->queue);
    Py_CLEAR(self->keep);
    Py_CLEAR(self->release_cb);
    Py_CLEAR(self->on_error);
    Py_CLEAR(self->on_lease);
    Py_CLEAR(self->on_closed);
    Py_CLEAR(self->clock);
    Py_CLEAR(self->dtype);
    Py_CLEAR(self->fmt);
    Py_CLEAR(self->item_type);
    return 0;
}

static void consumer_dealloc(ConsumerObject *self) {
    PyObject_GC_UnTrack(self);
    consumer_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int consumer_init(ConsumerObject *self, PyObject *args, PyObject *kw) {
    static char *names[] = {"queue", "keep", "consumer", "release_cb", "on_error", "on_lease", "on_closed",
                            "clock", "dtype", "fmt", "item_type", "data", "lease_state", "lease_deadline",
                            "prefetch_bytes", NULL};
    PyObject *queue, *keep, *release_cb, *on_error, *on_lease, *on_closed, *clock, *dtype, *fmt;
    PyTypeObject *item_type;
    unsigned long long cons, data, lstate, ldead, pfb;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOKOOOOOOOO!KKKK", names, &queue, &keep, &cons, &release_cb,
                                     &on_error, &on_lease, &on_closed, &clock, &dtype, &fmt, &PyType_Type,
                                     &item_type, &data, &lstate, &ldead, &pfb))
        return -1;
    if (!PyType_IsSubtype(item_type, &ItemType)) {
        PyErr_SetString(PyExc_TypeError, "item_type must be a subclass of Item");
        return -1;
    }
    if (fmt != Py_None && !PyBytes_Check(fmt)) {
        PyErr_SetString(PyExc_TypeError, "fmt must be bytes or None");
        return -1;
    }
    if (cons && (!lstate || !ldead)) {
        PyErr_SetString(PyExc_ValueError, "a native consumer needs the lease words");
        return -1;
    }
    PyObject *itemsize = PyObject_GetAttrString(dtype, "itemsize");
    if (!itemsize) return -1;
    self->itemsize = PyLong_AsSsize_t(itemsize);
    Py_DECREF(itemsize);
    if (self->itemsize <= 0) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "dtype itemsize must be positive");
        return -1;
    }
    consumer_clear(self);
    Py_INCREF(queue);
    self->queue = queue;
    Py_INCREF(keep);
    self->keep = keep;
    self->c = (gf_consumer *)(uintptr_t)cons;
    self->release_cb = release_cb == Py_None ? NULL : (Py_INCREF(release_cb), release_cb);
    Py_INCREF(on_error);
    self->on_error = on_error;
    Py_INCREF(on_lease);
    self->on_lease = on_lease;
    self->on_closed = on_closed == Py_None ? NULL : (Py_INCREF(on_closed), on_closed);
    Py_INCREF(clock);
    self->clock = clock;
    Py_INCREF(dtype);
    self->dtype = dtype;
    Py_INCREF(fmt);
    self->fmt = fmt;
    Py_INCREF(item_type);
    self->item_type = item_type;
    self->data = (char *)(uintptr_t)data;
    self->lease_state = (volatile uint64_t *)(uintptr_t)lstate;
    self->lease_deadline = (volatile uint64_t *)(uintptr_t)ldead;
    self->prefetch_bytes = pfb ? pfb : 4096;
    self->pf_i = self->pf_n = 0;
    self->fork_gen = g_fork_gen;
    self->tid = 0;
    self->multi = 0;
    return 0;
}

static PyMethodDef consumer_methods[] = {
    {"try_pop", (PyCFunction)consumer_try_pop, METH_NOARGS, "Pop one item, or None when the ring is empty."},
    {"item", (PyCFunction)consumer_item, METH_VARARGS, "item(token, offset, length, seq, base) -> Item"},
    {"batch_item", (PyCFunction)consumer_batch_item, METH_VARARGS,
     "batch_item(batch, offset, length, seq, base) -> Item of a batch"},
    {"prefetched", (PyCFunction)consumer_prefetched, METH_NOARGS, "Records prefetched, not handed out yet."},
    {"take_prefetched", (PyCFunction)consumer_take_prefetched, METH_O,
     "take_prefetched(k) -> (first_token, offsets, lengths, seqs) | None"},
    {"drop_prefetched", (PyCFunction)consumer_drop_prefetched, METH_NOARGS, "Forget the prefetched records."},
    {"note_thread", (PyCFunction)consumer_note_thread, METH_NOARGS, "Note a consumer call from this thread."},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef consumer_members[] = {
    {"closed", T_INT, offsetof(ConsumerObject, closed), 0, "set when the queue handle closed"},
    {"multi", T_INT, offsetof(ConsumerObject, multi), 0, "consumer calls came from more than one thread"},
    {"queue", T_OBJECT, offsetof(ConsumerObject, queue), READONLY, "the queue handle"},
    {NULL, 0, 0, 0, NULL},
};

static PyTypeObject ConsumerType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "grafos_fabric._item.Consumer",
    .tp_basicsize = sizeof(ConsumerObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "The consumer side of one queue handle: single-pop prefetch and the item factory.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)consumer_init,
    .tp_dealloc = (destructor)consumer_dealloc,
    .tp_traverse = (traverseproc)consumer_traverse,
    .tp_clear = (inquiry)consumer_clear,
    .tp_methods = consumer_methods,
    .tp_members = consumer_members,
};

/* ---------------------------------------------------------------------- Item */

static int item_unusable(ItemObject *self) {
    if (self->released) {
        PyErr_SetString(g_released_exc, "item was released: its bytes may have been reused");
        return 1;
    }
    return 0;
}

/* For an item of a batch: the batch's span array (raises if the batch was released). */
static PyObject *item_batch_pin(ItemObject *self) { return PyObject_CallMethod(self->batch, "_span", NULL); }

static int item_getbuffer(ItemObject *self, Py_buffer *view, int flags) {
    view->obj = NULL;
    if (flags & PyBUF_WRITABLE) {
        PyErr_SetString(PyExc_BufferError, "an item is read-only (copy it to change it: np.array(item))");
        return -1;
    }
    if (item_unusable(self)) return -1;
    ConsumerObject *core = self->core;
    Py_ssize_t itemsize = 1;
    const char *format = NULL;
    if ((flags & PyBUF_FORMAT) == PyBUF_FORMAT) {
        if (core->fmt == Py_None) {
            /* numpy then falls back to __array__, which gives the right dtype */
            PyErr_SetString(PyExc_BufferError, "this queue's dtype has no buffer format: use np.asarray(item)");
            return -1;
        }
        format = PyBytes_AS_STRING(core->fmt);
        itemsize = core->itemsize;
        if (self->length % itemsize) {
            PyErr_SetString(PyExc_BufferError, "item length is not a whole number of dtype elements");
            return -1;
        }
    }
    PyObject *pin = NULL;
    if (self->batch) {
        pin = item_batch_pin(self);
        if (!pin) return -1;
    }
    view->buf = self->ptr;
    view->len = self->length;
    view->readonly = 1;
    view->itemsize = itemsize;
    view->format = (char *)format;
    view->ndim = 1;
    view->shape = NULL;
    view->strides = NULL;
    view->suboffsets = NULL;
    view->internal = pin;
    if ((flags & PyBUF_ND) == PyBUF_ND) {
        /* the same values for every export of this item with this itemsize: kept in the item */
        Py_ssize_t *dims = itemsize == 1 ? self->dims_b : self->dims_t;
        dims[0] = self->length / itemsize;
        dims[1] = itemsize;
        view->shape = &dims[0];
        if ((flags & PyBUF_STRIDES) == PyBUF_STRIDES) view->strides = &dims[1];
    }
    view->obj = Py_NewRef((PyObject *)self);
    self->exports++;
    return 0;
}

static void item_releasebuffer(ItemObject *self, Py_buffer *view) {
    Py_XDECREF((PyObject *)view->internal);
    view->internal = NULL;
    if (--self->exports == 0 && self->released && self->pending) {
        self->pending = 0;
        core_release(self->core, self->token);
    }
}

static PyBufferProcs item_as_buffer = {
    .bf_getbuffer = (getbufferproc)item_getbuffer,
    .bf_releasebuffer = (releasebufferproc)item_releasebuffer,
};

static void item_dealloc(ItemObject *self) {
    if (self->weakrefs) PyObject_ClearWeakRefs((PyObject *)self);
    if (self->pending) {
        self->pending = 0;
        core_release(self->core, self->token);
    }
    Py_CLEAR(self->batch);
    Py_CLEAR(self->core);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *item_release(ItemObject *self, PyObject *unused) {
    if (!self->released) {
        self->released = 1;
        if (self->pending && self->exports == 0) {
            self->pending = 0;
            core_release(self->core, self->token);
        }
    }
    Py_RETURN_NONE;
}

static PyObject *item_array(ItemObject *self, PyObject *unused) {
    if (item_unusable(self)) return NULL;
    if (self->length % self->core->itemsize) {
        PyErr_Format(g_corrupted_exc, "an item of %zd bytes is not a whole number of %zd-byte dtype elements",
                     self->length, self->core->itemsize);
        return NULL;
    }
    return PyObject_CallFunctionObjArgs(g_frombuffer, (PyObject *)self, self->core->dtype, NULL);
}

static PyObject *item_dunder_array(ItemObject *self, PyObject *args, PyObject *kw) {
    static char *names[] = {"dtype", "copy", NULL};
    PyObject *dtype = Py_None, *copy = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "|OO", names, &dtype, &copy)) return NULL;
    PyObject *arr = item_array(self, NULL);
    if (!arr || (dtype == Py_None && copy == Py_None)) return arr;
    PyObject *r = PyObject_CallFunctionObjArgs(g_finish_array, arr, dtype, copy, NULL);
    Py_DECREF(arr);
    return r;
}

static PyObject *item_tobytes(ItemObject *self, PyObject *unused) {
    if (item_unusable(self)) return NULL;
    PyObject *pin = NULL;
    if (self->batch && !(pin = item_batch_pin(self))) return NULL;
    PyObject *r = PyBytes_FromStringAndSize(self->ptr, self->length);
    Py_XDECREF(pin);
    return r;
}

static PyObject *item_data(ItemObject *self, void *unused) {
    if (item_unusable(self)) return NULL;
    if (self->core->fmt == Py_None) {
        PyObject *arr = item_array(self, NULL);
        if (!arr) return NULL;
        PyObject *mv = PyObject_CallMethod(arr, "view", "s", "u1");
        Py_DECREF(arr);
        if (!mv) return NULL;
        PyObject *r = PyMemoryView_FromObject(mv);
        Py_DECREF(mv);
        return r;
    }
    PyObject *mv = PyMemoryView_FromObject((PyObject *)self);
    if (!mv || self->core->itemsize == 1) return mv;
    PyObject *r = PyObject_CallMethod(mv, "cast", "s", "B");
    Py_DECREF(mv);
    return r;
}

static PyObject *item_enter(PyObject *self, PyObject *unused) { return Py_NewRef(self); }

static PyObject *item_exit(ItemObject *self, PyObject *args) { return item_release(self, NULL); }

static PyObject *item_repr(ItemObject *self) {
    if (self->released) return PyUnicode_FromFormat("<Item seq=%llu released>", (unsigned long long)self->seq);
    return PyUnicode_FromFormat("<Item seq=%llu %zdB>", (unsigned long long)self->seq, self->length);
}

static Py_ssize_t item_len(ItemObject *self) { return self->length; }

static PyObject *item_get_released(ItemObject *self, void *unused) { return PyBool_FromLong(self->released); }
static PyObject *item_get_nbytes(ItemObject *self, void *unused) { return PyLong_FromSsize_t(self->length); }
static PyObject *item_get_seq(ItemObject *self, void *unused) { return PyLong_FromUnsignedLongLong(self->seq); }
static PyObject *item_get_offset(ItemObject *self, void *unused) { return PyLong_FromUnsignedLongLong(self->offset); }
static PyObject *item_get_token(ItemObject *self, void *unused) {
    return PyLong_FromLongLong(self->pending && !self->batch ? (long long)self->token : -1);
}
static PyObject *item_get_queue(ItemObject *self, void *unused) { return Py_NewRef(self->core->queue); }
static PyObject *item_get_exports(ItemObject *self, void *unused) { return PyLong_FromSsize_t(self->exports); }

static PyGetSetDef item_getset[] = {
    {"released", (getter)item_get_released, NULL, "True once release() was called (or the batch released)", NULL},
    {"nbytes", (getter)item_get_nbytes, NULL, "payload bytes", NULL},
    {"length", (getter)item_get_nbytes, NULL, "payload bytes", NULL},
    {"seq", (getter)item_get_seq, NULL, "the item's edge sequence number", NULL},
    {"offset", (getter)item_get_offset, NULL, "payload offset in the ring's data area", NULL},
    {"data", (getter)item_data, NULL, "the payload as a read-only byte memoryview (zero-copy)", NULL},
    {"_token", (getter)item_get_token, NULL, "release token still held (-1: none)", NULL},
    {"_q", (getter)item_get_queue, NULL, "the queue handle", NULL},
    {"_exports", (getter)item_get_exports, NULL, "buffer exports alive", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyMethodDef item_methods[] = {
    {"array", (PyCFunction)item_array, METH_NOARGS,
     "The payload as a read-only numpy view (uint8, or the queue's dtype)."},
    {"__array__", (PyCFunction)(void (*)(void))item_dunder_array, METH_VARARGS | METH_KEYWORDS, NULL},
    {"tobytes", (PyCFunction)item_tobytes, METH_NOARGS, "A copy of the payload (safe to keep after release)."},
    {"release", (PyCFunction)item_release, METH_NOARGS,
     "Let go of the item (idempotent). Its ring space is reused once the item is released and every view "
     "made from it is gone; the item itself can no longer make views."},
    {"__enter__", (PyCFunction)item_enter, METH_NOARGS, NULL},
    {"__exit__", (PyCFunction)item_exit, METH_VARARGS, NULL},
    {NULL, NULL, 0, NULL},
};

static PySequenceMethods item_as_sequence = {.sq_length = (lenfunc)item_len};

static PyObject *item_tp_new(PyTypeObject *tp, PyObject *args, PyObject *kw) {
    PyErr_SetString(PyExc_TypeError, "items come from FabricQueue.pop/try_pop/pop_batch; they cannot be made");
    return NULL;
}

static PyTypeObject ItemType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "grafos_fabric.Item",
    .tp_basicsize = sizeof(ItemObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .tp_doc = "One popped item: seq, len(), a zero-copy read-only buffer (memoryview(item), np.asarray(item), "
              "bytes(item)).",
    .tp_new = item_tp_new,
    .tp_dealloc = (destructor)item_dealloc,
    .tp_repr = (reprfunc)item_repr,
    .tp_as_buffer = &item_as_buffer,
    .tp_as_sequence = &item_as_sequence,
    .tp_methods = item_methods,
    .tp_getset = item_getset,
    .tp_weaklistoffset = offsetof(ItemObject, weakrefs),
};

/* ------------------------------------------------------------------ Producer */

typedef struct {
    PyObject_HEAD
    PyObject *queue;
    PyObject *keep;
    gf_producer *p;
    PyObject *clock;
    PyObject *validate; /* callable(obj) -> buffer-exporting object, for anything but exact bytes */
    PyObject *on_error; /* callable(rc, nbytes): raises */
    int typed;          /* the queue has a dtype: every push goes through validate */
    unsigned long fork_gen;
    int staged;         /* a staged (small) reservation is open: pushes wait their turn (GF_E_CLAIMED) */
} ProducerObject;

/* try_push(buf) -> seq | None (None: the ring is full) */
static PyObject *producer_try_push(ProducerObject *self, PyObject *buf) {
    Py_buffer view;
    const void *src;
    Py_ssize_t n;
    PyObject *held = NULL;
    int have_view = 0;
    if (self->staged || self->fork_gen != g_fork_gen)
        return PyObject_CallFunction(self->on_error, "inO", self->staged ? GF_E_CLAIMED : GF_E_ARG, (Py_ssize_t)0,
                                     buf);
    if (PyBytes_CheckExact(buf) && !self->typed) {
        src = PyBytes_AS_STRING(buf);
        n = PyBytes_GET_SIZE(buf);
    } else if (!self->typed && PyObject_GetBuffer(buf, &view, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) == 0) {
        /* any C-contiguous buffer of plain data; Python objects ('O') go to validate for the error */
        if (view.format && strchr(view.format, 'O')) {
            PyBuffer_Release(&view);
            held = PyObject_CallOneArg(self->validate, buf);
            if (!held) return NULL;
            Py_DECREF(held);
            PyErr_SetString(PyExc_TypeError, "arrays of Python objects cannot be pushed");
            return NULL;
        }
        have_view = 1;
        src = view.buf;
        n = view.len;
    } else {
        PyErr_Clear();
        held = PyObject_CallOneArg(self->validate, buf);
        if (!held) return NULL;
        if (PyObject_GetBuffer(held, &view, PyBUF_SIMPLE) < 0) {
            Py_DECREF(held);
            return NULL;
        }
        have_view = 1;
        src = view.buf;
        n = view.len;
    }
    uint64_t now, seq = 0;
    int rc;
    if (clock_now(self->clock, &now) < 0) {
        rc = INT32_MIN;
    } else if (n >= (1 << 16)) {
        /* a big copy: let other threads run meanwhile (the producer has its own lock) */
        Py_BEGIN_ALLOW_THREADS
        rc = g_push(self->p, src, (uint64_t)n, now, &seq);
        Py_END_ALLOW_THREADS
    } else {
        rc = g_push(self->p, src, (uint64_t)n, now, &seq);
    }
    if (have_view) PyBuffer_Release(&view);
    Py_XDECREF(held);
    if (rc == GF_OK) return PyLong_FromUnsignedLongLong(seq);
    if (rc == INT32_MIN) return NULL;
    if (rc == GF_FULL) Py_RETURN_NONE;
    /* raises the typed error, or (a reservation of another thread) waits and returns the push's result */
    return PyObject_CallFunction(self->on_error, "inO", rc, n, buf);
}

static int producer_traverse(ProducerObject *self, visitproc visit, void *arg) {
    Py_VISIT(self->queue);
    Py_VISIT(self->keep);
    Py_VISIT(self->clock);
    Py_VISIT(self->validate);
    Py_VISIT(self->on_error);
    return 0;
}

static int producer_clear(ProducerObject *self) {
    self->p = NULL;
    Py_CLEAR(self->queue);
    Py_CLEAR(self->keep);
    Py_CLEAR(self->clock);
    Py_CLEAR(self->validate);
    Py_CLEAR(self->on_error);
    return 0;
}

static void producer_dealloc(ProducerObject *self) {
    PyObject_GC_UnTrack(self);
    producer_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int producer_init(ProducerObject *self, PyObject *args, PyObject *kw) {
    static char *names[] = {"queue", "keep", "producer", "clock", "validate", "on_error", "typed", NULL};
    PyObject *queue, *keep, *clock, *validate, *on_error;
    unsigned long long prod;
    int typed;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOKOOOp", names, &queue, &keep, &prod, &clock, &validate, &on_error,
                                     &typed))
        return -1;
    if (!prod) {
        PyErr_SetString(PyExc_ValueError, "no native producer");
        return -1;
    }
    producer_clear(self);
    self->queue = Py_NewRef(queue);
    self->keep = Py_NewRef(keep);
    self->p = (gf_producer *)(uintptr_t)prod;
    self->clock = Py_NewRef(clock);
    self->validate = Py_NewRef(validate);
    self->on_error = Py_NewRef(on_error);
    self->typed = typed;
    self->fork_gen = g_fork_gen;
    return 0;
}

static PyMethodDef producer_methods[] = {
    {"try_push", (PyCFunction)producer_try_push, METH_O, "Push one item: its seq, or None when the ring is full."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject ProducerType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "grafos_fabric._item.Producer",
    .tp_basicsize = sizeof(ProducerObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "The producer side of one queue handle: one native call per push.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)producer_init,
    .tp_dealloc = (destructor)producer_dealloc,
    .tp_traverse = (traverseproc)producer_traverse,
    .tp_clear = (inquiry)producer_clear,
    .tp_methods = producer_methods,
};

/* --------------------------------------------------------------- Reservation */

/* One reusable reservation per producer handle: `with q.reserve(n) as buf:` /
 * `with q.reserve_batch(n, size) as rows:`. __enter__ claims ring space (one
 * native call) and hands out a writable numpy view of it; __exit__ publishes
 * it (or drops it when the block raised). */
typedef struct {
    PyObject_HEAD
    ProducerObject *prod;
    PyObject *queue;
    PyObject *ring;       /* writable uint8 array over the ring's data area (pins the mapping) */
    PyObject *dtype;      /* None, or the queue's dtype (views are of it) */
    PyObject *slow_enter; /* callable(nbytes, rows, timeout) -> (payload_off, rows): waits for room, raises */
    PyObject *timeout;
    PyObject *bad_arm;    /* callable(nbytes, rows): raises the typed error for bad arguments */
    PyObject *stage;      /* uint8 array: small items are written here and pushed on commit */
    PyObject *stage_views;/* dict nbytes -> view of stage[:nbytes] (in the queue's dtype) */
    PyObject *slow_push;  /* callable(nbytes, timeout) -> seq: push the staged item once there is room */
    char *stage_ptr;
    Py_ssize_t stage_max; /* reservations up to this many bytes are staged (0: never) */
    int staged;           /* the open reservation is staged */
    Py_ssize_t nbytes;    /* payload bytes of one item / row */
    Py_ssize_t rows_want; /* 0: a single item; else the rows asked for */
    Py_ssize_t rows;      /* rows reserved */
    Py_ssize_t commit_len;/* single: bytes to publish; rows: rows to publish */
    Py_ssize_t max_item;
    Py_ssize_t itemsize;
    uint64_t seq;
    unsigned long armed_by; /* the thread that armed it: only it may enter */
    int armed;
    int active;
} ReservationObject;

static PyObject *res_view(ReservationObject *self, uint64_t off) {
    if (self->rows_want) {
        uint64_t stride = g_record_size((uint64_t)self->nbytes);
        return PyObject_CallFunction(g_rows_view, "OKnnKO", self->ring, (unsigned long long)off, self->rows,
                                     self->nbytes, (unsigned long long)stride, self->dtype);
    }
    PyObject *lo = PyLong_FromUnsignedLongLong(off);
    PyObject *hi = PyLong_FromUnsignedLongLong(off + (uint64_t)self->nbytes);
    PyObject *sl = lo && hi ? PySlice_New(lo, hi, NULL) : NULL;
    Py_XDECREF(lo);
    Py_XDECREF(hi);
    if (!sl) return NULL;
    PyObject *v = PyObject_GetItem(self->ring, sl);
    Py_DECREF(sl);
    if (!v || self->dtype == Py_None) return v;
    PyObject *t = PyObject_CallMethod(v, "view", "O", self->dtype);
    Py_DECREF(v);
    return t;
}

static PyObject *res_enter(ReservationObject *self, PyObject *unused) {
    if (!self->armed || self->armed_by != PyThread_get_thread_ident()) {
        PyErr_SetString(g_released_exc,
                        "use `with q.reserve(n) as buf:` in one go (a reservation is entered once, by the thread "
                        "that asked for it)");
        return NULL;
    }
    ProducerObject *pr = self->prod;
    if (!pr->p) {
        PyErr_SetString(PyExc_RuntimeError, "the producer is gone");
        return NULL;
    }
    self->armed = 0;
    if (!self->rows_want && self->nbytes <= self->stage_max) {
        /* A small item: a view of the ring costs more than copying the item on
         * commit, so it is written into a staging buffer and pushed on exit. */
        PyObject *key = PyLong_FromSsize_t(self->nbytes);
        if (!key) return NULL;
        PyObject *v = PyDict_GetItemWithError(self->stage_views, key);
        if (v) {
            Py_INCREF(v);
        } else if (!PyErr_Occurred()) {
            PyObject *sl = PySlice_New(NULL, key, NULL);
            v = sl ? PyObject_GetItem(self->stage, sl) : NULL;
            Py_XDECREF(sl);
            if (v && self->dtype != Py_None) {
                PyObject *t = PyObject_CallMethod(v, "view", "O", self->dtype);
                Py_DECREF(v);
                v = t;
            }
            if (v && PyDict_Size(self->stage_views) >= 64) PyDict_Clear(self->stage_views);
            if (v && PyDict_SetItem(self->stage_views, key, v) < 0) Py_CLEAR(v);
        }
        Py_DECREF(key);
        if (!v) return NULL;
        self->rows = 1;
        self->commit_len = self->nbytes;
        self->staged = 1;
        pr->staged = 1;
        self->active = 1;
        return v;
    }
    uint64_t now, off = 0, got = 1;
    if (clock_now(pr->clock, &now) < 0) return NULL;
    int rc = self->rows_want
                 ? g_reserve_rows(pr->p, (uint64_t)self->rows_want, (uint64_t)self->nbytes, now, &off, &got)
                 : g_reserve(pr->p, (uint64_t)self->nbytes, now, &off);
    if (rc == GF_FULL) {
        PyObject *r = PyObject_CallFunction(self->slow_enter, "nnO", self->nbytes, self->rows_want, self->timeout);
        if (!r) return NULL;
        unsigned long long o, g;
        int ok = PyArg_ParseTuple(r, "KK", &o, &g);
        Py_DECREF(r);
        if (!ok) return NULL;
        off = o;
        got = g;
    } else if (rc != GF_OK) {
        PyObject *r = PyObject_CallFunction(pr->on_error, "inO", rc, self->nbytes, Py_None);
        Py_XDECREF(r);
        if (r) PyErr_SetString(PyExc_RuntimeError, "reserve failed");
        return NULL;
    }
    if (got == 0 || off + (got - 1) * g_record_size((uint64_t)self->nbytes) + (uint64_t)self->nbytes >
                        (uint64_t)PyObject_Length(self->ring)) {
        /* the native layer never does this; refuse rather than hand out a view past the ring */
        g_abort(pr->p);
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_RuntimeError, "reservation outside the ring");
        return NULL;
    }
    self->rows = (Py_ssize_t)got;
    self->commit_len = self->rows_want ? self->rows : self->nbytes;
    PyObject *v = res_view(self, off);
    if (!v) {
        g_abort(pr->p);
        return NULL;
    }
    self->active = 1;
    return v;
}

static PyObject *res_exit(ReservationObject *self, PyObject *args) {
    PyObject *et = Py_None;
    if (PyTuple_GET_SIZE(args) > 0) et = PyTuple_GET_ITEM(args, 0);
    if (!self->active) Py_RETURN_FALSE;
    self->active = 0;
    ProducerObject *pr = self->prod;
    if (!pr->p) Py_RETURN_FALSE;
    uint64_t seq = 0;
    if (self->staged) {
        self->staged = 0;
        pr->staged = 0;
        if (et != Py_None) Py_RETURN_FALSE;
        uint64_t now;
        if (clock_now(pr->clock, &now) < 0) return NULL;
        int rc = g_push(pr->p, self->stage_ptr, (uint64_t)self->commit_len, now, &seq);
        if (rc == GF_FULL) {
            PyObject *r = PyObject_CallFunction(self->slow_push, "nO", self->commit_len, self->timeout);
            if (!r) return NULL;
            seq = PyLong_AsUnsignedLongLong(r);
            Py_DECREF(r);
            if (PyErr_Occurred()) return NULL;
        } else if (rc != GF_OK) {
            PyObject *r = PyObject_CallFunction(pr->on_error, "inO", rc, self->commit_len, Py_None);
            Py_XDECREF(r);
            if (r) Py_RETURN_FALSE;
            return NULL;
        }
        self->seq = seq;
        goto done;
    }
    if (et != Py_None) {
        g_abort(pr->p);
        Py_RETURN_FALSE;
    }
    int rc = self->rows_want ? g_commit_rows(pr->p, (uint64_t)self->commit_len, &seq)
                             : g_commit(pr->p, (uint64_t)self->commit_len, &seq);
    if (rc != GF_OK) {
        PyObject *r = PyObject_CallFunction(pr->on_error, "inO", rc, self->nbytes, Py_None);
        Py_XDECREF(r);
        if (r) Py_RETURN_FALSE;
        return NULL;
    }
    self->seq = seq;
    if (self->rows_want) seq += (uint64_t)self->commit_len - 1;
done:;
    PyObject *s = PyLong_FromUnsignedLongLong(seq);
    if (!s) return NULL;
    int bad = PyObject_SetAttr(self->queue, g_str_last_seq, s);
    Py_DECREF(s);
    if (bad) return NULL;
    Py_RETURN_FALSE;
}

/* arm(nbytes, rows, timeout) -> self: validated by the caller's Python wrapper */
static PyObject *res_arm(ReservationObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "arm(nbytes, rows, timeout)");
        return NULL;
    }
    if (self->active) {
        PyErr_SetString(g_released_exc, "a reservation of this handle is still open: commit it first");
        return NULL;
    }
    Py_ssize_t n = -1, rows = -1;
    if (PyLong_CheckExact(args[0]) && PyLong_CheckExact(args[1])) {
        n = PyLong_AsSsize_t(args[0]);
        rows = PyLong_AsSsize_t(args[1]);
        if (PyErr_Occurred()) {
            PyErr_Clear();
            n = rows = -1;
        }
    }
    if (n <= 0 || rows < 0 || n > self->max_item || n % self->itemsize ||
        (args[2] != Py_None && !PyFloat_CheckExact(args[2]) && !PyLong_CheckExact(args[2]))) {
        PyObject *r = PyObject_CallFunctionObjArgs(self->bad_arm, args[0], args[1], args[2], NULL);
        Py_XDECREF(r);
        if (r) PyErr_SetString(g_released_exc, "bad reservation");
        return NULL;
    }
    self->nbytes = n;
    self->rows_want = rows;
    Py_XSETREF(self->timeout, Py_NewRef(args[2]));
    self->armed = 1;
    self->armed_by = PyThread_get_thread_ident();
    return Py_NewRef((PyObject *)self);
}

static PyObject *res_set_commit(ReservationObject *self, PyObject *arg) {
    Py_ssize_t k = PyLong_AsSsize_t(arg);
    if (k == -1 && PyErr_Occurred()) return NULL;
    Py_ssize_t hi = self->rows_want ? self->rows : self->nbytes;
    if (!self->active || k <= 0 || k > hi) {
        PyErr_Format(g_released_exc, "commit length must be in (0, %zd] inside an open reservation", hi);
        return NULL;
    }
    self->commit_len = k;
    Py_RETURN_NONE;
}

static int res_traverse(ReservationObject *self, visitproc visit, void *arg) {
    Py_VISIT(self->prod);
    Py_VISIT(self->queue);
    Py_VISIT(self->ring);
    Py_VISIT(self->dtype);
    Py_VISIT(self->slow_enter);
    Py_VISIT(self->timeout);
    Py_VISIT(self->bad_arm);
    Py_VISIT(self->stage);
    Py_VISIT(self->stage_views);
    Py_VISIT(self->slow_push);
    return 0;
}

static int res_clear(ReservationObject *self) {
    Py_CLEAR(self->prod);
    Py_CLEAR(self->queue);
    Py_CLEAR(self->ring);
    Py_CLEAR(self->dtype);
    Py_CLEAR(self->slow_enter);
    Py_CLEAR(self->timeout);
    Py_CLEAR(self->bad_arm);
    Py_CLEAR(self->stage);
    Py_CLEAR(self->stage_views);
    Py_CLEAR(self->slow_push);
    self->stage_ptr = NULL;
    self->stage_max = 0;
    return 0;
}

static void res_dealloc(ReservationObject *self) {
    PyObject_GC_UnTrack(self);
    res_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int res_init(ReservationObject *self, PyObject *args, PyObject *kw) {
    static char *names[] = {"producer", "queue", "ring", "dtype", "slow_enter", "bad_arm", "stage", "slow_push",
                            "max_item", "itemsize", NULL};
    PyObject *prod, *queue, *ring, *dtype, *slow, *bad, *stage, *slow_push;
    Py_ssize_t max_item, itemsize;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O!OOOOOOOnn", names, &ProducerType, &prod, &queue, &ring, &dtype,
                                     &slow, &bad, &stage, &slow_push, &max_item, &itemsize))
        return -1;
    if (itemsize <= 0 || max_item <= 0) {
        PyErr_SetString(PyExc_ValueError, "max_item and itemsize must be positive");
        return -1;
    }
    res_clear(self);
    Py_buffer view;
    if (PyObject_GetBuffer(stage, &view, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0) return -1;
    /* the array keeps its memory; the staging view is only read on commit, with the GIL held */
    self->stage_ptr = view.buf;
    self->stage_max = view.len;
    PyBuffer_Release(&view);
    self->stage_views = PyDict_New();
    if (!self->stage_views) return -1;
    self->prod = (ProducerObject *)Py_NewRef(prod);
    self->queue = Py_NewRef(queue);
    self->ring = Py_NewRef(ring);
    self->dtype = Py_NewRef(dtype);
    self->slow_enter = Py_NewRef(slow);
    self->bad_arm = Py_NewRef(bad);
    self->stage = Py_NewRef(stage);
    self->slow_push = Py_NewRef(slow_push);
    self->timeout = Py_NewRef(Py_None);
    self->max_item = max_item;
    self->itemsize = itemsize;
    self->armed = self->active = self->staged = 0;
    return 0;
}

static PyObject *res_get_seq(ReservationObject *self, void *unused) { return PyLong_FromUnsignedLongLong(self->seq); }
static PyObject *res_get_rows(ReservationObject *self, void *unused) { return PyLong_FromSsize_t(self->rows); }
static PyObject *res_get_active(ReservationObject *self, void *unused) { return PyBool_FromLong(self->active); }
static PyObject *res_get_batch(ReservationObject *self, void *unused) { return PyBool_FromLong(self->rows_want != 0); }

static PyGetSetDef res_getset[] = {
    {"seq", (getter)res_get_seq, NULL, "sequence number of the (first) item last committed", NULL},
    {"rows", (getter)res_get_rows, NULL, "rows reserved (reserve_batch)", NULL},
    {"active", (getter)res_get_active, NULL, "inside the with block", NULL},
    {"batch", (getter)res_get_batch, NULL, "a reserve_batch reservation", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyMethodDef res_methods[] = {
    {"__enter__", (PyCFunction)res_enter, METH_NOARGS, NULL},
    {"__exit__", (PyCFunction)res_exit, METH_VARARGS, NULL},
    {"arm", (PyCFunction)(void (*)(void))res_arm, METH_FASTCALL, NULL},
    {"set_commit", (PyCFunction)res_set_commit, METH_O, NULL},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject ReservationType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "grafos_fabric._item.Reservation",
    .tp_basicsize = sizeof(ReservationObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "A reusable reservation: `with q.reserve(n) as buf:` writes an item in place.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)res_init,
    .tp_dealloc = (destructor)res_dealloc,
    .tp_traverse = (traverseproc)res_traverse,
    .tp_clear = (inquiry)res_clear,
    .tp_methods = res_methods,
    .tp_getset = res_getset,
};

/* -------------------------------------------------------------------- module */

/* bind(entry_points: dict name -> address, frombuffer, released_exc, finish_array, rows_view) */
static int bind_one(PyObject *d, const char *name, void **slot) {
    PyObject *v = PyDict_GetItemString(d, name);
    if (!v) {
        PyErr_Format(PyExc_KeyError, "native entry point %s missing", name);
        return -1;
    }
    unsigned long long a = PyLong_AsUnsignedLongLong(v);
    if (PyErr_Occurred()) return -1;
    if (!a) {
        PyErr_Format(PyExc_ValueError, "native entry point %s is null", name);
        return -1;
    }
    *slot = (void *)(uintptr_t)a;
    return 0;
}

static PyObject *mod_bind(PyObject *mod, PyObject *args) {
    PyObject *d, *fb, *exc, *fin, *rows, *corrupted;
    if (!PyArg_ParseTuple(args, "O!OOOOO", &PyDict_Type, &d, &fb, &exc, &fin, &rows, &corrupted)) return NULL;
    if (bind_one(d, "gf_pop_batch", (void **)&g_pop_batch) || bind_one(d, "gf_release", (void **)&g_release) ||
        bind_one(d, "gf_push", (void **)&g_push) || bind_one(d, "gf_consumer_outstanding", (void **)&g_outstanding) ||
        bind_one(d, "gf_reserve", (void **)&g_reserve) || bind_one(d, "gf_commit", (void **)&g_commit) ||
        bind_one(d, "gf_abort", (void **)&g_abort) || bind_one(d, "gf_reserve_rows", (void **)&g_reserve_rows) ||
        bind_one(d, "gf_commit_rows", (void **)&g_commit_rows) ||
        bind_one(d, "gf_record_size", (void **)&g_record_size))
        return NULL;
    Py_XSETREF(g_frombuffer, Py_NewRef(fb));
    Py_XSETREF(g_released_exc, Py_NewRef(exc));
    Py_XSETREF(g_finish_array, Py_NewRef(fin));
    Py_XSETREF(g_rows_view, Py_NewRef(rows));
    Py_XSETREF(g_corrupted_exc, Py_NewRef(corrupted));
    Py_RETURN_NONE;
}

static PyMethodDef mod_methods[] = {
    {"bind", mod_bind, METH_VARARGS, "Hand over the native entry points and helpers (once, at import)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef moddef = {
    PyModuleDef_HEAD_INIT, "grafos_fabric._item", "The queue's single-item hot path (see native/gf_item.c).", -1,
    mod_methods,
};

PyMODINIT_FUNC PyInit__item(void) {
    if (PyType_Ready(&ItemType) < 0 || PyType_Ready(&ConsumerType) < 0 || PyType_Ready(&ProducerType) < 0 ||
        PyType_Ready(&ReservationType) < 0)
        return NULL;
    if (pthread_atfork(NULL, NULL, after_fork_in_child) != 0) {
        PyErr_SetString(PyExc_OSError, "pthread_atfork failed");
        return NULL;
    }
    g_str_last_seq = PyUnicode_InternFromString("last_seq");
    if (!g_str_last_seq) return NULL;
    PyObject *m = PyModule_Create(&moddef);
    if (!m) return NULL;
    if (PyModule_AddObjectRef(m, "Item", (PyObject *)&ItemType) < 0 ||
        PyModule_AddObjectRef(m, "Consumer", (PyObject *)&ConsumerType) < 0 ||
        PyModule_AddObjectRef(m, "Producer", (PyObject *)&ProducerType) < 0 ||
        PyModule_AddObjectRef(m, "Reservation", (PyObject *)&ReservationType) < 0 ||
        PyModule_AddIntConstant(m, "GF_NATIVE_ABI", GF_NATIVE_ABI) < 0 ||
        PyModule_AddIntConstant(m, "PREFETCH_ITEMS", PF_MAX) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
