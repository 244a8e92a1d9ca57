/*
 * gf_item.c: grafos_fabric._item, the base type of a popped item
 * (grafos_fabric.queue.Item), in C so that it exports the buffer protocol.
 *
 * Built with the limited API of CPython 3.11 (Py_LIMITED_API 0x030B0000: a
 * heap type from PyType_FromSpec; the Py_bf_getbuffer/Py_bf_releasebuffer
 * slots are in the limited API from 3.11), so it goes into the same abi3
 * wheel as the cffi module.
 *
 *   memoryview(item), np.asarray(item), np.frombuffer(item), bytes(item)
 *   read the payload in place (read-only; a writable request is refused).
 *
 * Lifetime (the queue's rule, exactly): the item counts its exports. Its ring
 * space goes back to the queue (queue._release_token(token)) when the item is
 * released (release(), `with`, or garbage) AND its last export is gone, never
 * before: bf_releasebuffer and tp_dealloc do it. An export holds the item, the
 * item holds its queue, the queue holds the mapping, so a view never outlives
 * its mapping. An item of a Batch never releases ring space itself (its batch
 * does); each export of it pins the batch's span (batch._span(), which raises
 * once the batch was released).
 *
 * What the item may point at is checked when it is made: offset and length
 * lie inside the queue's data area (queue._item_info: data address, capacity,
 * buffer format, itemsize), so no Python caller can make it read outside the
 * mapping. Everything here runs with the GIL held: the counters need no lock.
 *
 * Why one file of ~1,850 lines (the project keeps modules under ~800): the
 * native single-item path (PLock, Fast, QueueBase, Reservation, below) builds
 * items and spans itself and shares the module state (interned names, the fork
 * generation, the type objects, numpy's API table); in one translation unit
 * those stay static and the item constructor inlines into pop. Sections, in
 * order: Item (first), then under dashed banners Releaser, Span, PLock (the
 * producer lock), Fast (with QueueBase, whose methods it serves, and
 * pop_array) and Reservation; PyInit__item at the end.
 */
#ifndef Py_LIMITED_API
#define Py_LIMITED_API 0x030B0000
#endif
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <stdint.h>
#include <pthread.h>
#include <string.h>

#include "gf_native.h" /* gf_consumer and gf_release: gf_native.c is compiled into this module too */
#include "gf_item.h"  /* what gf_ckpt.c (checkpoint() in C, also in this module) uses: PLock, the GC dealloc */

/* numpy's C API (its function table, fetched at import by import_array): only to
 * make a reservation's view, a uint8 array over the ring, without numpy's slicing
 * machinery. numpy's headers build under Py_LIMITED_API; setup.py builds against
 * numpy >= 2 with NPY_TARGET_VERSION 1.24 (pyproject's floor), which numpy 1.24
 * and later all load. */
#define NPY_NO_DEPRECATED_API NPY_1_7_API_VERSION
#ifndef NPY_TARGET_VERSION
#define NPY_TARGET_VERSION NPY_1_24_API_VERSION
#endif
#include <numpy/arrayobject.h>

/* Bumped in a child after fork(): a Releaser made before it must not release
 * there (the native consumer is the parent's: it would move the parent's head). */
static volatile unsigned long g_fork_gen;
static void after_fork_in_child(void) { g_fork_gen++; }

/* Releaser(buffer over a gf_consumer): lets items release their token with one
 * native call instead of a call into Python. It holds the buffer (so the
 * consumer state's memory, owned by the queue's cffi object) until it goes.
 * close() (the queue closed) and fork() turn it off: items then go through
 * queue._release_token (closed: it also gives the role back) or do nothing
 * (a forked child). Private: the buffer must be the queue's own gf_consumer. */
typedef struct {
    PyObject_HEAD
    Py_buffer view;
    gf_consumer *c;
    unsigned long fork_gen;
    int closed;
} ReleaserObject;

static PyTypeObject *g_releaser_type;

typedef struct {
    PyObject_HEAD
    PyObject *q;        /* the queue handle: pins the mapping */
    PyObject *batch;    /* the Batch this item belongs to (it owns the release), or NULL */
    PyObject *fmt;      /* buffer format (bytes) of one element, or NULL: exports carry no typed format */
    ReleaserObject *rel; /* the queue's native release path, or NULL */
    PyObject *weakrefs;
    char *ptr;
    Py_ssize_t length;
    Py_ssize_t itemsize;
    unsigned long long seq;
    unsigned long long offset;
    long long token;    /* release token (items of a batch: 0, unused) */
    Py_ssize_t exports;
    Py_ssize_t dims_b[2]; /* shape and stride of a byte export (the same for every one) */
    Py_ssize_t dims_t[2]; /* ... and of a typed one */
    int pending;        /* the token is still to be released into the queue */
    int released;       /* release() was called: no new exports */
    int byte_export;    /* set by _byte_view() for one export: bytes, whatever the format */
} ItemBase;

static PyObject *g_item_type;     /* ItemBase */
static PyObject *g_released_exc;  /* errors.FabricValueError */
static PyObject *g_corrupted_exc; /* errors.Corrupted */
static PyObject *g_str_release_token;
static PyObject *g_str_item_info;
static PyObject *g_str_span;

/* Give the token back to the queue. Never raises (a finalizer calls it too). */
static void item_give_back(ItemBase *self) {
    ReleaserObject *rel = self->rel;
    if (rel && rel->fork_gen != g_fork_gen) return; /* a forked child: the parent's consumer, not ours */
    if (rel && !rel->closed) {
        gf_release(rel->c, (uint64_t)self->token); /* a bad token is refused there (GF_E_ARG) */
        return;
    }
    PyObject *et, *ev, *tb;
    PyErr_Fetch(&et, &ev, &tb);
    PyObject *t = PyLong_FromLongLong(self->token);
    PyObject *r = t ? PyObject_CallMethodObjArgs(self->q, g_str_release_token, t, NULL) : NULL;
    if (!r) PyErr_WriteUnraisable(self->q);
    Py_XDECREF(r);
    Py_XDECREF(t);
    PyErr_Restore(et, ev, tb);
}

static PyObject *item_new(PyTypeObject *tp, PyObject *args, PyObject *kw) {
    static char *names[] = {"q", "token", "offset", "length", "seq", "batch", NULL};
    PyObject *q, *batch;
    long long token;
    unsigned long long offset, seq;
    Py_ssize_t length;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OLKnKO", names, &q, &token, &offset, &length, &seq, &batch))
        return NULL;
    if (token < 0 || length <= 0) {
        PyErr_SetString(g_released_exc ? g_released_exc : PyExc_ValueError,
                        "an item needs a token >= 0 and a positive length");
        return NULL;
    }
    PyObject *info = PyObject_GetAttr(q, g_str_item_info);
    if (!info) return NULL;
    unsigned long long addr, cap;
    PyObject *fmt;
    Py_ssize_t itemsize;
    PyObject *rel = Py_None;
    if (!PyArg_ParseTuple(info, "KKOn|O;queue._item_info must be (address, capacity, format, itemsize[, releaser])",
                          &addr, &cap, &fmt, &itemsize, &rel)) {
        Py_DECREF(info);
        return NULL;
    }
    if (rel != Py_None && !PyObject_TypeCheck(rel, g_releaser_type)) {
        Py_DECREF(info);
        PyErr_SetString(PyExc_TypeError, "queue._item_info[4] must be a Releaser or None");
        return NULL;
    }
    /* the item may only point inside the queue's data area */
    if (addr == 0 || itemsize <= 0 || (fmt != Py_None && !PyBytes_Check(fmt)) || offset > cap ||
        (unsigned long long)length > cap - offset) {
        Py_DECREF(info);
        PyErr_SetString(g_released_exc ? g_released_exc : PyExc_ValueError,
                        "item offset/length lie outside the queue's data area");
        return NULL;
    }
    allocfunc alloc = (allocfunc)PyType_GetSlot(tp, Py_tp_alloc);
    ItemBase *self = (ItemBase *)alloc(tp, 0);
    if (!self) {
        Py_DECREF(info);
        return NULL;
    }
    self->q = Py_NewRef(q);
    self->batch = batch == Py_None ? NULL : Py_NewRef(batch);
    self->fmt = fmt == Py_None ? NULL : Py_NewRef(fmt);
    self->rel = rel == Py_None ? NULL : (ReleaserObject *)Py_NewRef(rel);
    Py_DECREF(info);
    self->weakrefs = NULL;
    self->ptr = (char *)(uintptr_t)addr + offset;
    self->length = length;
    self->itemsize = itemsize;
    self->seq = seq;
    self->offset = offset;
    self->token = token;
    self->exports = 0;
    self->pending = self->batch == NULL;
    self->released = 0;
    self->byte_export = 0;
    return (PyObject *)self;
}

static void item_dealloc(PyObject *o) {
    ItemBase *self = (ItemBase *)o;
    PyTypeObject *tp = Py_TYPE(o);
    if (self->weakrefs) PyObject_ClearWeakRefs(o);
    if (self->pending && self->q) {
        self->pending = 0;
        item_give_back(self);
    }
    Py_CLEAR(self->batch);
    Py_CLEAR(self->fmt);
    Py_CLEAR(self->rel);
    Py_CLEAR(self->q);
    freefunc f = (freefunc)PyType_GetSlot(tp, Py_tp_free);
    f(o);
    Py_DECREF(tp);
}

static int item_getbuffer(PyObject *o, Py_buffer *view, int flags) {
    ItemBase *self = (ItemBase *)o;
    view->obj = NULL;
    if (flags & PyBUF_WRITABLE) {
        PyErr_SetString(PyExc_BufferError, "an item is read-only (copy it to change it: np.array(item))");
        return -1;
    }
    if (self->released) {
        PyErr_SetString(g_released_exc, "item was released: its bytes may have been reused");
        return -1;
    }
    Py_ssize_t itemsize = 1;
    const char *format = NULL;
    if ((flags & PyBUF_FORMAT) == PyBUF_FORMAT && self->byte_export) {
        format = "B";
    } else if ((flags & PyBUF_FORMAT) == PyBUF_FORMAT) {
        if (!self->fmt) {
            /* numpy then falls back to __array__, which gives the right dtype */
            PyErr_SetString(PyExc_BufferError,
                            "this queue's dtype has no buffer format: use np.asarray(item) or item.data");
            return -1;
        }
        format = PyBytes_AsString(self->fmt);
        if (!format) return -1;
        itemsize = self->itemsize;
        if (self->length % itemsize) {
            PyErr_Format(g_corrupted_exc, "an item of %zd bytes is not a whole number of %zd-byte dtype elements",
                         self->length, itemsize);
            return -1;
        }
    }
    PyObject *pin = NULL;
    if (self->batch) {
        pin = PyObject_CallMethodObjArgs(self->batch, g_str_span, NULL);
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
        /* every export of this item with this element size has the same shape: kept in the item */
        Py_ssize_t *dims = itemsize == 1 ? self->dims_b : self->dims_t;
        dims[0] = self->length / itemsize;
        dims[1] = itemsize;
        view->shape = &dims[0];
        if ((flags & PyBUF_STRIDES) == PyBUF_STRIDES) view->strides = &dims[1];
    }
    view->obj = Py_NewRef(o);
    self->exports++;
    return 0;
}

static void item_releasebuffer(PyObject *o, Py_buffer *view) {
    ItemBase *self = (ItemBase *)o;
    Py_XDECREF((PyObject *)view->internal);
    view->internal = NULL;
    if (--self->exports == 0 && self->released && self->pending) {
        self->pending = 0;
        item_give_back(self);
    }
}

static PyObject *item_release(PyObject *o, PyObject *unused) {
    ItemBase *self = (ItemBase *)o;
    if (!self->released) {
        self->released = 1;
        if (self->pending && self->exports == 0) {
            self->pending = 0;
            item_give_back(self);
        }
    }
    Py_RETURN_NONE;
}

/* _byte_view() -> a read-only byte memoryview (format B), whatever the queue's dtype */
static PyObject *item_byte_view(PyObject *o, PyObject *unused) {
    ItemBase *self = (ItemBase *)o;
    self->byte_export = 1;
    PyObject *mv = PyMemoryView_FromObject(o);
    self->byte_export = 0;
    return mv;
}

static PyObject *item_enter(PyObject *o, PyObject *unused) { return Py_NewRef(o); }

static PyObject *item_exit(PyObject *o, PyObject *args) {
    PyObject *r = item_release(o, NULL);
    if (!r) return NULL;
    Py_DECREF(r);
    Py_RETURN_NONE;
}

static Py_ssize_t item_len(PyObject *o) { return ((ItemBase *)o)->length; }

static PyObject *item_get_released(PyObject *o, void *unused) { return PyBool_FromLong(((ItemBase *)o)->released); }
static PyObject *item_get_length(PyObject *o, void *unused) { return PyLong_FromSsize_t(((ItemBase *)o)->length); }
static PyObject *item_get_seq(PyObject *o, void *unused) { return PyLong_FromUnsignedLongLong(((ItemBase *)o)->seq); }
static PyObject *item_get_offset(PyObject *o, void *unused) {
    return PyLong_FromUnsignedLongLong(((ItemBase *)o)->offset);
}
static PyObject *item_get_token(PyObject *o, void *unused) {
    ItemBase *self = (ItemBase *)o;
    return PyLong_FromLongLong(self->released ? -1 : self->token);
}
static PyObject *item_get_q(PyObject *o, void *unused) { return Py_NewRef(((ItemBase *)o)->q); }
static PyObject *item_get_batch(PyObject *o, void *unused) {
    ItemBase *self = (ItemBase *)o;
    return Py_NewRef(self->batch ? self->batch : Py_None);
}
static PyObject *item_get_exports(PyObject *o, void *unused) { return PyLong_FromSsize_t(((ItemBase *)o)->exports); }

static PyGetSetDef item_getset[] = {
    {"released", item_get_released, NULL, "True once release() was called", NULL},
    {"length", item_get_length, NULL, "payload bytes", NULL},
    {"nbytes", item_get_length, NULL, "payload bytes", NULL},
    {"seq", item_get_seq, NULL, "the item's sequence number", NULL},
    {"offset", item_get_offset, NULL, "payload offset in the ring's data area", NULL},
    {"_token", item_get_token, NULL, "release token (-1 once released)", NULL},
    {"_q", item_get_q, NULL, "the queue handle", NULL},
    {"_batch", item_get_batch, NULL, "the batch the item belongs to, or None", NULL},
    {"_exports", item_get_exports, NULL, "buffer exports alive", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyMemberDef item_members[] = {
    {"__weaklistoffset__", T_PYSSIZET, offsetof(ItemBase, weakrefs), READONLY, NULL},
    {NULL, 0, 0, 0, NULL},
};

static PyMethodDef item_methods[] = {
    {"release", item_release, METH_NOARGS,
     "Let go of the item (idempotent). Its ring space is reused once the item is released and every view made "
     "from it is gone; the item itself can no longer make views. Items of a batch are released with their batch."},
    {"_byte_view", item_byte_view, METH_NOARGS, "A read-only byte memoryview of the payload (format B)."},
    {"__enter__", item_enter, METH_NOARGS, NULL},
    {"__exit__", item_exit, METH_VARARGS, NULL},
    {NULL, NULL, 0, NULL},
};

static PyType_Slot item_slots[] = {
    {Py_tp_doc, "Base of grafos_fabric.queue.Item: the buffer protocol and the release bookkeeping."},
    {Py_tp_new, item_new},
    {Py_tp_dealloc, item_dealloc},
    {Py_tp_methods, item_methods},
    {Py_tp_getset, item_getset},
    {Py_tp_members, item_members},
    {Py_sq_length, item_len},
    {Py_bf_getbuffer, item_getbuffer},
    {Py_bf_releasebuffer, item_releasebuffer},
    {0, NULL},
};

static PyType_Spec item_spec = {
    .name = "grafos_fabric._item.ItemBase",
    .basicsize = sizeof(ItemBase),
    .itemsize = 0,
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .slots = item_slots,
};

/* -------------------------------------------------------------- Releaser */

static PyObject *releaser_new(PyTypeObject *tp, PyObject *args, PyObject *kw) {
    PyObject *buf;
    if (!PyArg_ParseTuple(args, "O", &buf)) return NULL;
    allocfunc alloc = (allocfunc)PyType_GetSlot(tp, Py_tp_alloc);
    ReleaserObject *self = (ReleaserObject *)alloc(tp, 0);
    if (!self) return NULL;
    if (PyObject_GetBuffer(buf, &self->view, PyBUF_WRITABLE | PyBUF_SIMPLE) < 0) {
        self->view.obj = NULL;
        Py_DECREF(self);
        return NULL;
    }
    if (self->view.len != (Py_ssize_t)sizeof(gf_consumer) || ((uintptr_t)self->view.buf & 7)) {
        PyErr_SetString(PyExc_ValueError, "a Releaser needs the buffer of a gf_consumer");
        Py_DECREF(self);
        return NULL;
    }
    self->c = (gf_consumer *)self->view.buf;
    self->fork_gen = g_fork_gen;
    self->closed = 0;
    return (PyObject *)self;
}

static void releaser_dealloc(PyObject *o) {
    ReleaserObject *self = (ReleaserObject *)o;
    PyTypeObject *tp = Py_TYPE(o);
    if (self->view.obj) PyBuffer_Release(&self->view);
    freefunc f = (freefunc)PyType_GetSlot(tp, Py_tp_free);
    f(o);
    Py_DECREF(tp);
}

static PyObject *releaser_close(PyObject *o, PyObject *unused) {
    ((ReleaserObject *)o)->closed = 1;
    Py_RETURN_NONE;
}

static PyMethodDef releaser_methods[] = {
    {"close", releaser_close, METH_NOARGS, "Items release through queue._release_token from now on."},
    {NULL, NULL, 0, NULL},
};

static PyType_Slot releaser_slots[] = {
    {Py_tp_doc, "The native release path of a queue's items (private: see native/gf_item.c)."},
    {Py_tp_new, releaser_new},
    {Py_tp_dealloc, releaser_dealloc},
    {Py_tp_methods, releaser_methods},
    {0, NULL},
};

static PyType_Spec releaser_spec = {
    .name = "grafos_fabric._item.Releaser",
    .basicsize = sizeof(ReleaserObject),
    .itemsize = 0,
    .flags = Py_TPFLAGS_DEFAULT,
    .slots = releaser_slots,
};

/* ------------------------------------------------------------------ Span */

/* Span(q, offset, length, writable): a buffer over [offset, offset + length) of
 * the queue's data area (the range checked against queue._item_info), holding
 * the queue: what a reservation's view is made from, so the view pins the
 * queue and its mapping without a reference cycle through the queue. */
typedef struct {
    PyObject_HEAD
    PyObject *q;
    char *ptr;
    Py_ssize_t length;
    Py_ssize_t shape;
    int writable;
} SpanObject;

static PyObject *span_new(PyTypeObject *tp, PyObject *args, PyObject *kw) {
    static char *names[] = {"q", "offset", "length", "writable", NULL};
    PyObject *q;
    unsigned long long offset;
    Py_ssize_t length;
    int writable = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OKn|p", names, &q, &offset, &length, &writable)) return NULL;
    PyObject *info = PyObject_GetAttr(q, g_str_item_info);
    if (!info) return NULL;
    unsigned long long addr, cap;
    PyObject *fmt;
    Py_ssize_t itemsize;
    PyObject *rel;
    int ok = PyArg_ParseTuple(info, "KKOn|O;queue._item_info must be (address, capacity, format, itemsize[, releaser])",
                              &addr, &cap, &fmt, &itemsize, &rel);
    Py_DECREF(info);
    if (!ok) return NULL;
    if (addr == 0 || length < 0 || offset > cap || (unsigned long long)length > cap - offset) {
        PyErr_SetString(g_released_exc, "span lies outside the queue's data area");
        return NULL;
    }
    allocfunc alloc = (allocfunc)PyType_GetSlot(tp, Py_tp_alloc);
    SpanObject *self = (SpanObject *)alloc(tp, 0);
    if (!self) return NULL;
    self->q = Py_NewRef(q);
    self->ptr = (char *)(uintptr_t)addr + offset;
    self->length = length;
    self->shape = length;
    self->writable = writable;
    return (PyObject *)self;
}

static void span_dealloc(PyObject *o) {
    SpanObject *self = (SpanObject *)o;
    PyTypeObject *tp = Py_TYPE(o);
    Py_CLEAR(self->q);
    freefunc f = (freefunc)PyType_GetSlot(tp, Py_tp_free);
    f(o);
    Py_DECREF(tp);
}

static int span_getbuffer(PyObject *o, Py_buffer *view, int flags) {
    SpanObject *self = (SpanObject *)o;
    view->obj = NULL;
    if ((flags & PyBUF_WRITABLE) && !self->writable) {
        PyErr_SetString(PyExc_BufferError, "this span is read-only");
        return -1;
    }
    view->buf = self->ptr;
    view->len = self->length;
    view->readonly = !self->writable;
    view->itemsize = 1;
    view->format = (flags & PyBUF_FORMAT) == PyBUF_FORMAT ? "B" : NULL;
    view->ndim = 1;
    view->shape = (flags & PyBUF_ND) == PyBUF_ND ? &self->shape : NULL;
    view->strides = NULL;
    view->suboffsets = NULL;
    view->internal = NULL;
    view->obj = Py_NewRef(o);
    return 0;
}

static void span_releasebuffer(PyObject *o, Py_buffer *view) {}

static PyType_Slot span_slots[] = {
    {Py_tp_doc, "A buffer over part of a queue's data area that holds the queue (reservation views)."},
    {Py_tp_new, span_new},
    {Py_tp_dealloc, span_dealloc},
    {Py_bf_getbuffer, span_getbuffer},
    {Py_bf_releasebuffer, span_releasebuffer},
    {0, NULL},
};

static PyType_Spec span_spec = {
    .name = "grafos_fabric._item.Span",
    .basicsize = sizeof(SpanObject),
    .itemsize = 0,
    .flags = Py_TPFLAGS_DEFAULT,
    .slots = span_slots,
};

/* ----------------------------------------------------------------- PLock */

/* PLock(): a handle's producer lock, a recursive lock (the same rules as
 * threading.RLock: the holder may take it again; only the holder releases it)
 * that the native reservation takes and gives back with a C call, not a call
 * into Python. Python code uses it as a context manager or with
 * acquire()/release().
 *
 * Every call runs with the GIL held (this module is built for the limited API,
 * which has no free-threaded build), so owner and count are plain fields: a
 * free lock is taken by setting them, with no OS call. Only a thread that finds
 * it held by another thread blocks: it counts itself in `waiters` and sleeps,
 * with the GIL released, on `wake` (a PyThread lock used as a semaphore: held
 * while nobody is woken); the last release posts it when someone waits. A woken
 * thread takes the lock only if it is free when it has the GIL again, else it
 * sleeps again (a spurious wake-up costs a loop, never a wrong owner). A blocked
 * acquire wakes for signals: their handlers run, and an exception they raise
 * (KeyboardInterrupt) comes out of acquire with the lock not taken, as with
 * threading.RLock. Fork: in the child only the forking thread exists; the
 * first call there gives the lock a fresh `wake`, keeps what that thread held
 * and drops what other threads held or waited for. */
typedef struct {
    PyObject_HEAD
    PyThread_type_lock wake;
    unsigned long owner;   /* thread id of the holder (meaningful while count > 0) */
    unsigned long count;   /* 0: free */
    unsigned long waiters; /* threads sleeping on wake */
    unsigned long fork_gen;
} PLockObject;

static PyTypeObject *g_plock_type;

/* a PyThread lock that is held: acquiring it sleeps until it is released */
static PyThread_type_lock plock_new_wake(void) {
    PyThread_type_lock w = PyThread_allocate_lock();
    if (w && PyThread_acquire_lock(w, NOWAIT_LOCK) != PY_LOCK_ACQUIRED) { /* new: always free */
        PyThread_free_lock(w);
        w = NULL;
    }
    return w;
}

/* after fork(): a fresh wake lock (the old one is the parent's, left as it is);
 * 0, or -1 with MemoryError set */
static int plock_after_fork(PLockObject *self) {
    PyThread_type_lock fresh = plock_new_wake();
    if (!fresh) {
        PyErr_NoMemory();
        return -1;
    }
    self->wake = fresh;
    self->fork_gen = g_fork_gen;
    self->waiters = 0;
    if (self->count > 0 && self->owner != PyThread_get_thread_ident()) {
        self->count = 0;
        self->owner = 0;
    }
    return 0;
}

/* Take the lock (blocking); 0, or -1 with an error set (a signal handler raised
 * while it waited, or the count would overflow): the lock is then not taken. */
static int plock_acquire_c(PLockObject *self) {
    if (self->fork_gen != g_fork_gen && plock_after_fork(self) < 0) return -1;
    unsigned long me = PyThread_get_thread_ident();
    if (self->count > 0) {
        if (self->owner == me) {
            if (self->count == ULONG_MAX) {
                PyErr_SetString(PyExc_OverflowError, "producer lock taken too many times");
                return -1;
            }
            self->count++;
            return 0;
        }
        self->waiters++;
        for (;;) {
            if (self->fork_gen != g_fork_gen) { /* a signal handler forked, and this is the child */
                if (plock_after_fork(self) < 0) return -1; /* (waiters is 0 there) */
                self->waiters = 1;
            }
            if (self->count == 0) break;
            PyThread_type_lock wake = self->wake;
            PyLockStatus st;
            Py_BEGIN_ALLOW_THREADS
            st = PyThread_acquire_lock_timed(wake, -1, 1);
            Py_END_ALLOW_THREADS
            if (st == PY_LOCK_INTR && PyErr_CheckSignals() < 0) {
                self->waiters--;
                return -1;
            }
        }
        self->waiters--;
    }
    self->owner = me;
    self->count = 1;
    return 0;
}

/* Give one level back; 0, or -1 with RuntimeError when this thread does not hold it. */
static int plock_release_c(PLockObject *self) {
    if (self->fork_gen != g_fork_gen && plock_after_fork(self) < 0) return -1;
    if (self->count == 0 || self->owner != PyThread_get_thread_ident()) {
        PyErr_SetString(PyExc_RuntimeError, "cannot release un-acquired lock");
        return -1;
    }
    if (--self->count == 0) {
        self->owner = 0;
        if (self->waiters) PyThread_release_lock(self->wake); /* wake one sleeper (it checks again) */
    }
    return 0;
}

static PyObject *plock_new(PyTypeObject *tp, PyObject *args, PyObject *kw) {
    if (PyTuple_Size(args) != 0 || (kw && PyDict_Size(kw) != 0)) {
        PyErr_SetString(PyExc_TypeError, "PLock() takes no arguments");
        return NULL;
    }
    allocfunc alloc = (allocfunc)PyType_GetSlot(tp, Py_tp_alloc);
    PLockObject *self = (PLockObject *)alloc(tp, 0);
    if (!self) return NULL;
    self->wake = plock_new_wake();
    if (!self->wake) {
        Py_DECREF(self);
        return PyErr_NoMemory();
    }
    self->fork_gen = g_fork_gen;
    return (PyObject *)self;
}

static void plock_dealloc(PyObject *o) {
    PLockObject *self = (PLockObject *)o;
    PyTypeObject *tp = Py_TYPE(o);
    /* nobody waits on a lock that is going away (a waiter holds a reference) */
    if (self->wake && self->fork_gen == g_fork_gen) PyThread_free_lock(self->wake); /* else: the parent's */
    self->wake = NULL;
    freefunc f = (freefunc)PyType_GetSlot(tp, Py_tp_free);
    f(o);
    Py_DECREF(tp);
}

static PyObject *plock_py_acquire(PyObject *o, PyObject *unused) {
    if (plock_acquire_c((PLockObject *)o) < 0) return NULL;
    Py_RETURN_TRUE;
}

static PyObject *plock_py_release(PyObject *o, PyObject *unused) {
    if (plock_release_c((PLockObject *)o) < 0) return NULL;
    Py_RETURN_NONE;
}

static PyObject *plock_py_exit(PyObject *o, PyObject *const *args, Py_ssize_t nargs) {
    if (plock_release_c((PLockObject *)o) < 0) return NULL;
    Py_RETURN_NONE;
}

/* gf_item.h: PLock for gf_ckpt.c */
int gf_item_is_plock(PyObject *o) { return PyObject_TypeCheck(o, g_plock_type); }
int gf_item_plock_acquire(PyObject *o) { return plock_acquire_c((PLockObject *)o); }
int gf_item_plock_release(PyObject *o) { return plock_release_c((PLockObject *)o); }

/* _is_owned(): this thread holds it (as threading.RLock._is_owned) */
static PyObject *plock_is_owned(PyObject *o, PyObject *unused) {
    PLockObject *self = (PLockObject *)o;
    if (self->fork_gen != g_fork_gen && plock_after_fork(self) < 0) return NULL;
    return PyBool_FromLong(self->count > 0 && self->owner == PyThread_get_thread_ident());
}

static PyObject *plock_get_count(PyObject *o, void *unused) {
    PLockObject *self = (PLockObject *)o;
    if (self->fork_gen != g_fork_gen && plock_after_fork(self) < 0) return NULL;
    return PyLong_FromUnsignedLong(self->count);
}

static PyMethodDef plock_methods[] = {
    {"acquire", plock_py_acquire, METH_NOARGS, "acquire() -> True: take the lock, waiting for it (reentrant)."},
    {"release", plock_py_release, METH_NOARGS, "release(): give one level back (RuntimeError if not held here)."},
    {"__enter__", plock_py_acquire, METH_NOARGS, NULL},
    {"__exit__", (PyCFunction)(void (*)(void))plock_py_exit, METH_FASTCALL, NULL},
    {"_is_owned", plock_is_owned, METH_NOARGS, "_is_owned() -> bool: this thread holds the lock."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef plock_getset[] = {
    {"_count", plock_get_count, NULL, "how many times the holder has taken it (0: free)", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyType_Slot plock_slots[] = {
    {Py_tp_doc, "A handle's producer lock: a recursive lock the native reservation takes without a Python call."},
    {Py_tp_new, plock_new},
    {Py_tp_dealloc, plock_dealloc},
    {Py_tp_methods, plock_methods},
    {Py_tp_getset, plock_getset},
    {0, NULL},
};

static PyType_Spec plock_spec = {
    .name = "grafos_fabric._item.PLock",
    .basicsize = sizeof(PLockObject),
    .itemsize = 0,
    .flags = Py_TPFLAGS_DEFAULT,
    .slots = plock_slots,
};

/* ------------------------------------------------------------------ Fast */

/* QueueBase: the base class of FabricQueue, whose push/try_push/pop/try_pop
 * are these C methods, so that q.push(buf) / q.try_push(buf) / q.pop() /
 * q.try_pop() are each ONE native call from Python. Each serves only the common
 * case, with the handle's Fast (the state below, bound once by _fast_bind), and
 * hands every other one to the class's Python method of the same name with
 * "_slow_" in front (_slow_push, ...), which does exactly what the method always
 * did (waits, errors, the role claim, fences, closed and forked handles):
 *
 *   push/try_push   the producer is claimed (set_producer), the handle is open,
 *                   not forked, the queue has no dtype, the item is exact bytes
 *                   or a C-contiguous buffer without Python objects, not empty;
 *                   then one gf_push (which takes the native producer lock,
 *                   checks the lease state and deadline against the native clock
 *                   and the tail word's owner/epoch, as every push does). FULL:
 *                   try_push answers False; push waits in Python. Any error:
 *                   the Python method runs again and raises the typed error.
 *   pop/try_pop     the consumer is claimed (set_consumer). Records prefetched
 *                   by one gf_pop_batch (up to FAST_PF_MAX, tokens of their own)
 *                   go out one per call after a lease check (state + deadline vs
 *                   the native clock); an empty prefetch is refilled by one
 *                   gf_pop_batch from the thread that pops here (another thread:
 *                   Python, which notes it). EMPTY: try_pop answers None; any
 *                   other outcome goes to Python.
 *
 * The prefetch is also the handle's prefetch iterator for the Python code
 * (q._pf_it): next() hands out (token, offset, length, seq); take(k) the first
 * k as one run (pop_batch). Everything runs with the GIL held and no Python
 * code runs between reading and updating the prefetch (the record is taken
 * before the item is allocated), so each record goes to exactly one caller.
 * close() (the handle closed) and fork() (the pthread_atfork generation) turn
 * every fast path off. A Fast holds nothing of the handle's Python objects (the
 * handle holds it: no cycle); items hold the handle. Only FabricQueue makes
 * one: the buffers it is given must be the handle's own gf_producer /
 * gf_consumer. */
#define FAST_PF_MAX 64
#define FAST_GIL_FREE_BYTES (1 << 16) /* pushes this big copy without the GIL */

typedef struct {
    PyObject_HEAD
    Py_buffer pview;
    gf_producer *p;
    Py_buffer cview;
    gf_consumer *c;
    ReleaserObject *rel;
    PyTypeObject *item_type;
    PyObject *fmt;
    Py_ssize_t itemsize;
    char *data;
    unsigned long long cap;
    unsigned long long pf_bytes;
    unsigned long long pf_token; /* token of offs[pf_pos] */
    Py_ssize_t pf_pos, pf_n;
    unsigned long tid;    /* the thread whose refills run here (0: none) */
    unsigned long fork_gen;
    int typed;
    int closed;
    PyObject *ring;          /* writable uint8 array over the data area (pins the mapping, not the handle) */
    char *ring_data;         /* its first byte */
    PLockObject *plock;      /* the handle's producer lock */
    PyObject *res;           /* a reusable Reservation (not in use), or NULL */
    PyArray_Descr *arr_descr; /* pop_array's dtype (set_array_dtype), or NULL: pop_array takes the Python path */
    uint64_t max_item;
    uint64_t ring_len;
    uint64_t offs[FAST_PF_MAX], lens[FAST_PF_MAX], seqs[FAST_PF_MAX];
} FastObject;

static PyTypeObject *g_fast_type;

static inline int fast_off(FastObject *self) { return self->closed || self->fork_gen != g_fork_gen; }

typedef struct {
    PyObject_HEAD
    FastObject *fast; /* NULL: every call takes the Python path */
    /* the handle's reservation state (FabricQueue's _reserving, _reserver, _commit_len,
     * _give_back_after_reserve, last_seq: attributes in C, so a native reservation
     * sets them without a dictionary) */
    PyObject *last_seq;   /* an int set from Python, or NULL: last_seq_raw (when have_seq), else -1 */
    unsigned long reserver; /* thread id of the open reservation (when have_reserver): ints made on demand */
    uint64_t last_seq_raw;  /* set by a native commit */
    int have_reserver;
    int have_seq;
    Py_ssize_t commit_len;
    int reserving;
    int give_back_after_reserve;
} QueueBaseObject;

static PyObject *g_str_slow_push, *g_str_slow_try_push, *g_str_slow_pop, *g_str_slow_try_pop, *g_str_slow_pop_array;
static PyObject *g_str_timeout;

/* q._slow_<name>(buf, timeout): the Python method */
static PyObject *fast_slow(PyObject *q, PyObject *name, PyObject *buf, PyObject *timeout) {
    if (buf && timeout) return PyObject_CallMethodObjArgs(q, name, buf, timeout, NULL);
    if (buf) return PyObject_CallMethodObjArgs(q, name, buf, NULL);
    if (timeout) return PyObject_CallMethodObjArgs(q, name, timeout, NULL);
    return PyObject_CallMethodObjArgs(q, name, NULL);
}

/* (buf, timeout=None) from fastcall arguments; 0 ok, -1 error set */
static int fast_args(PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames, int nbuf, PyObject **buf,
                     PyObject **timeout) {
    *buf = NULL;
    *timeout = NULL;
    Py_ssize_t nkw = kwnames ? PyTuple_Size(kwnames) : 0;
    if (nargs > nbuf + 1 || nargs < 0) goto bad;
    if (nbuf) {
        if (nargs < 1) goto bad;
        *buf = args[0];
    }
    if (nargs > nbuf) *timeout = args[nbuf];
    for (Py_ssize_t i = 0; i < nkw; i++) {
        PyObject *k = PyTuple_GetItem(kwnames, i);
        if (!k) return -1;
        /* keyword names in a call are interned: the pointer test is the common case */
        if (*timeout || (k != g_str_timeout && PyUnicode_CompareWithASCIIString(k, "timeout") != 0)) goto bad;
        *timeout = args[nargs + i];
    }
    return 0;
bad:
    PyErr_SetString(PyExc_TypeError, nbuf ? "expected (buf, timeout=None)" : "expected (timeout=None)");
    return -1;
}

/* a timeout the fast path may ignore (it never waits): None, a float >= 0 or an
 * int >= 0 (exact types: bool, subclasses and anything else go to the Python path,
 * which checks them; so do ints past 2**63, which it refuses as too large) */
static inline int fast_timeout_ok(PyObject *t) {
    if (!t || t == Py_None) return 1;
    if (PyFloat_CheckExact(t)) {
        double v = PyFloat_AsDouble(t);
        return v >= 0.0; /* NaN: no */
    }
    if (PyLong_CheckExact(t)) {
        int overflow = 0;
        long long v = PyLong_AsLongLongAndOverflow(t, &overflow);
        return overflow == 0 && v >= 0; /* (v == -1 with an error set cannot happen for an exact int) */
    }
    return 0;
}

/* One push: 1 pushed (*seq), 0 full, -1 take the slow path (nothing pushed). */
static int fast_push1(FastObject *self, PyObject *buf, uint64_t *seq) {
    if (!self || fast_off(self) || !self->p || self->typed) return -1;
    const char *src;
    Py_ssize_t n;
    Py_buffer view;
    int have_view = 0;
    if (PyBytes_CheckExact(buf)) {
        src = PyBytes_AsString(buf);
        n = PyBytes_Size(buf);
        if (!src) {
            PyErr_Clear();
            return -1;
        }
    } else {
        if (PyObject_GetBuffer(buf, &view, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0) {
            PyErr_Clear(); /* str, non-contiguous, not a buffer: the slow path names the error */
            return -1;
        }
        if (view.format && strchr(view.format, 'O')) { /* Python objects (or a name with an O): slow path */
            PyBuffer_Release(&view);
            return -1;
        }
        have_view = 1;
        src = view.buf;
        n = view.len;
    }
    int rc;
    if (n <= 0) {
        rc = GF_E_ARG;
    } else if (n >= FAST_GIL_FREE_BYTES) {
        /* a big copy lets other threads run (the native producer lock serializes pushes) */
        Py_BEGIN_ALLOW_THREADS
        rc = gf_push(self->p, src, (uint64_t)n, 0, seq);
        Py_END_ALLOW_THREADS
    } else {
        rc = gf_push(self->p, src, (uint64_t)n, 0, seq);
    }
    if (have_view) PyBuffer_Release(&view);
    if (rc == GF_OK) return 1;
    if (rc == GF_FULL) return 0;
    return -1;
}

static PyObject *qb_push(PyObject *q, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames) {
    FastObject *self = ((QueueBaseObject *)q)->fast;
    PyObject *buf, *timeout;
    if (fast_args(args, nargs, kwnames, 1, &buf, &timeout) < 0) return NULL;
    if (fast_timeout_ok(timeout)) {
        uint64_t seq;
        if (fast_push1(self, buf, &seq) == 1) return PyLong_FromUnsignedLongLong(seq);
    }
    return fast_slow(q, g_str_slow_push, buf, timeout ? timeout : Py_None);
}

static PyObject *qb_try_push(PyObject *q, PyObject *buf) {
    uint64_t seq;
    int r = fast_push1(((QueueBaseObject *)q)->fast, buf, &seq);
    if (r == 1) Py_RETURN_TRUE;
    if (r == 0) Py_RETURN_FALSE;
    return fast_slow(q, g_str_slow_try_push, buf, NULL);
}

/* An item of the queue for a record this handle took: range-checked against
 * the data area, released natively (the Releaser). On failure the record's
 * token is released (the item never went out). */
static PyObject *fast_item(FastObject *self, PyObject *q, uint64_t token, uint64_t off, uint64_t len, uint64_t seq) {
    if (off > self->cap || len == 0 || len > self->cap - off) {
        gf_release(self->c, token);
        PyErr_SetString(g_corrupted_exc, "a record lies outside the queue's data area");
        return NULL;
    }
    allocfunc alloc = (allocfunc)PyType_GetSlot(self->item_type, Py_tp_alloc);
    ItemBase *it = (ItemBase *)alloc(self->item_type, 0);
    if (!it) {
        gf_release(self->c, token);
        return NULL;
    }
    it->q = Py_NewRef(q);
    it->batch = NULL;
    it->fmt = self->fmt ? Py_NewRef(self->fmt) : NULL;
    it->rel = (ReleaserObject *)Py_NewRef((PyObject *)self->rel);
    it->weakrefs = NULL;
    it->ptr = self->data + off;
    it->length = (Py_ssize_t)len;
    it->itemsize = self->itemsize;
    it->seq = seq;
    it->offset = off;
    it->token = (long long)token;
    it->exports = 0;
    it->pending = 1;
    it->released = 0;
    it->byte_export = 0;
    return (PyObject *)it;
}

/* One pop: an item (new reference), Py_None (borrowed, not incref'd: the ring
 * is empty), or NULL: the slow path (no error set) or an error (set). */
static PyObject *fast_pop1(FastObject *self, PyObject *q) {
    if (!self || fast_off(self) || !self->c) return NULL;
    uint64_t token, off, len, seq;
    if (self->pf_pos < self->pf_n) {
        /* a prefetched record: the lease is checked again (fail closed) */
        if (self->c->lease_state) {
            if (gf_load_acquire_u64(self->c->lease_state) != GF_LEASE_ACTIVE ||
                gf_monotonic_ns() >= gf_load_acquire_u64(self->c->lease_deadline))
                return NULL;
        }
    } else {
        if (self->tid != PyThread_get_thread_ident()) return NULL; /* Python notes the thread */
        uint64_t outs[3];
        int rc = gf_pop_batch(self->c, FAST_PF_MAX, self->pf_bytes, 1, 0, self->offs, self->lens, self->seqs,
                              &outs[0], &outs[1], &outs[2]);
        if (rc == GF_EMPTY) return Py_None;
        if (rc != GF_OK || outs[0] == 0 || outs[0] > FAST_PF_MAX) return NULL;
        self->pf_n = (Py_ssize_t)outs[0];
        self->pf_pos = 0;
        self->pf_token = outs[1];
    }
    /* take the record before anything that may run Python code (the allocation) */
    Py_ssize_t i = self->pf_pos++;
    token = self->pf_token++;
    off = self->offs[i];
    len = self->lens[i];
    seq = self->seqs[i];
    return fast_item(self, q, token, off, len, seq);
}

static PyObject *qb_try_pop(PyObject *q, PyObject *unused) {
    PyObject *r = fast_pop1(((QueueBaseObject *)q)->fast, q);
    if (r == Py_None) Py_RETURN_NONE;
    if (r || PyErr_Occurred()) return r;
    return fast_slow(q, g_str_slow_try_pop, NULL, NULL);
}

static PyObject *qb_pop(PyObject *q, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames) {
    PyObject *buf, *timeout;
    if (fast_args(args, nargs, kwnames, 0, &buf, &timeout) < 0) return NULL;
    if (fast_timeout_ok(timeout)) {
        PyObject *r = fast_pop1(((QueueBaseObject *)q)->fast, q);
        if (r && r != Py_None) return r;
        if (!r && PyErr_Occurred()) return NULL;
    }
    return fast_slow(q, g_str_slow_pop, NULL, timeout ? timeout : Py_None);
}

/* pop_array(timeout=None) -> a read-only 1-D array of the queue's dtype (uint8 without
 * one) over the next item's payload, made with numpy's C API; its base is the item, so
 * the item's ring space goes back when the array and every view of it are gone (the
 * item's dealloc). Served natively when a record is prefetched (or refilled here) and
 * the dtype is set; every other case is q._slow_pop_array(timeout). */
static PyObject *fast_item_array(FastObject *f, PyObject *item) {
    ItemBase *it = (ItemBase *)item;
    Py_ssize_t isz = f->arr_descr ? PyDataType_ELSIZE(f->arr_descr) : 0;
    if (isz <= 0 || it->length % isz) {
        Py_DECREF(item); /* released (its dealloc gives the token back) */
        PyErr_Format(g_corrupted_exc, "an item of %zd bytes is not a whole number of %zd-byte dtype elements",
                     it->length, isz);
        return NULL;
    }
    npy_intp dims[1] = {(npy_intp)(it->length / isz)};
    Py_INCREF((PyObject *)f->arr_descr);
    npy_intp align = PyDataType_ALIGNMENT(f->arr_descr);
    int flags = NPY_ARRAY_C_CONTIGUOUS; /* read-only (no NPY_ARRAY_WRITEABLE); aligned only if it is */
    if (align <= 1 || (uintptr_t)it->ptr % (uintptr_t)align == 0) flags |= NPY_ARRAY_ALIGNED;
    PyObject *arr = PyArray_NewFromDescr(&PyArray_Type, f->arr_descr, 1, dims, NULL, it->ptr, flags, NULL);
    if (!arr) {
        Py_DECREF(item);
        return NULL;
    }
    if (PyArray_SetBaseObject((PyArrayObject *)arr, item) < 0) { /* steals the item (also on failure) */
        Py_DECREF(arr);
        return NULL;
    }
    return arr;
}

static PyObject *qb_pop_array(PyObject *q, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames) {
    PyObject *buf, *timeout;
    if (fast_args(args, nargs, kwnames, 0, &buf, &timeout) < 0) return NULL;
    FastObject *f = ((QueueBaseObject *)q)->fast;
    if (f && f->arr_descr && fast_timeout_ok(timeout)) {
        PyObject *r = fast_pop1(f, q);
        if (r && r != Py_None) return fast_item_array(f, r);
        if (!r && PyErr_Occurred()) return NULL;
    }
    return fast_slow(q, g_str_slow_pop_array, NULL, timeout ? timeout : Py_None);
}

/* set_array_dtype(dtype): pop_array's element type (a numpy dtype without Python objects
 * whose size is the queue's itemsize) */
static PyObject *fast_set_array_dtype(PyObject *o, PyObject *arg) {
    FastObject *self = (FastObject *)o;
    if (!PyArray_DescrCheck(arg) || PyDataType_REFCHK((PyArray_Descr *)arg) ||
        PyDataType_ELSIZE((PyArray_Descr *)arg) <= 0 ||
        (self->c && PyDataType_ELSIZE((PyArray_Descr *)arg) != self->itemsize)) {
        PyErr_SetString(PyExc_TypeError, "set_array_dtype needs the queue's numpy dtype (no objects, its itemsize)");
        return NULL;
    }
    PyArray_Descr *old = self->arr_descr;
    self->arr_descr = (PyArray_Descr *)Py_NewRef(arg);
    Py_XDECREF((PyObject *)old);
    Py_RETURN_NONE;
}

/* set_producer(buffer over the handle's gf_producer, ring, plock): ring is a writable
 * uint8 array over the whole data area (reservation views are slices of it), plock the
 * handle's producer lock */
static PyObject *fast_set_producer(PyObject *o, PyObject *args) {
    FastObject *self = (FastObject *)o;
    PyObject *buf, *ring, *plock;
    if (!PyArg_ParseTuple(args, "OOO", &buf, &ring, &plock)) return NULL;
    if (self->p) {
        PyErr_SetString(PyExc_ValueError, "the producer is set already");
        return NULL;
    }
    /* reservation views are made over it with numpy's C API: it must be what
     * FabricQueue passes, a writable, C-contiguous, 1-D uint8 ndarray */
    if (!PyArray_CheckExact(ring) || PyArray_NDIM((PyArrayObject *)ring) != 1 ||
        PyArray_TYPE((PyArrayObject *)ring) != NPY_UINT8 ||
        !PyArray_CHKFLAGS((PyArrayObject *)ring, NPY_ARRAY_CARRAY)) {
        PyErr_SetString(PyExc_TypeError, "set_producer needs a writable, C-contiguous 1-D uint8 array over the ring");
        return NULL;
    }
    Py_ssize_t ring_len = (Py_ssize_t)PyArray_SIZE((PyArrayObject *)ring);
    if (!PyObject_TypeCheck(plock, g_plock_type)) {
        PyErr_SetString(PyExc_TypeError, "set_producer needs the handle's PLock");
        return NULL;
    }
    if (PyObject_GetBuffer(buf, &self->pview, PyBUF_WRITABLE | PyBUF_SIMPLE) < 0) return NULL;
    if (self->pview.len != (Py_ssize_t)sizeof(gf_producer) || ((uintptr_t)self->pview.buf & 7)) {
        PyBuffer_Release(&self->pview);
        PyErr_SetString(PyExc_ValueError, "set_producer needs the buffer of a gf_producer");
        return NULL;
    }
    self->p = (gf_producer *)self->pview.buf;
    self->max_item = self->p->max_item;
    self->ring = Py_NewRef(ring);
    self->ring_data = PyArray_BYTES((PyArrayObject *)ring);
    self->ring_len = (uint64_t)ring_len;
    self->plock = (PLockObject *)Py_NewRef(plock);
    Py_RETURN_NONE;
}

/* set_consumer(buffer over the handle's gf_consumer, releaser, item_type, address, capacity, fmt, itemsize,
 * prefetch_bytes, tid) */
static PyObject *fast_set_consumer(PyObject *o, PyObject *args) {
    FastObject *self = (FastObject *)o;
    PyObject *buf, *rel, *tp, *fmt;
    unsigned long long addr, cap, pf_bytes, tid;
    Py_ssize_t itemsize;
    if (!PyArg_ParseTuple(args, "OOOKKOnKK", &buf, &rel, &tp, &addr, &cap, &fmt, &itemsize, &pf_bytes, &tid))
        return NULL;
    if (self->c) {
        PyErr_SetString(PyExc_ValueError, "the consumer is set already");
        return NULL;
    }
    if (!PyObject_TypeCheck(rel, g_releaser_type) || !PyType_Check(tp) ||
        !PyType_IsSubtype((PyTypeObject *)tp, (PyTypeObject *)g_item_type) || (fmt != Py_None && !PyBytes_Check(fmt)) ||
        addr == 0 || itemsize <= 0 || pf_bytes == 0) {
        PyErr_SetString(PyExc_TypeError, "set_consumer: bad arguments");
        return NULL;
    }
    if (PyObject_GetBuffer(buf, &self->cview, PyBUF_WRITABLE | PyBUF_SIMPLE) < 0) return NULL;
    if (self->cview.len != (Py_ssize_t)sizeof(gf_consumer) || ((uintptr_t)self->cview.buf & 7) ||
        ((ReleaserObject *)rel)->c != (gf_consumer *)self->cview.buf) {
        PyBuffer_Release(&self->cview);
        PyErr_SetString(PyExc_ValueError, "set_consumer needs the buffer of the releaser's gf_consumer");
        return NULL;
    }
    self->c = (gf_consumer *)self->cview.buf;
    self->rel = (ReleaserObject *)Py_NewRef(rel);
    self->item_type = (PyTypeObject *)Py_NewRef(tp);
    self->fmt = fmt == Py_None ? NULL : Py_NewRef(fmt);
    self->itemsize = itemsize;
    self->data = (char *)(uintptr_t)addr;
    self->cap = cap;
    self->pf_bytes = pf_bytes;
    self->tid = (unsigned long)tid;
    Py_RETURN_NONE;
}

static PyObject *fast_note_thread(PyObject *o, PyObject *arg) {
    unsigned long long t = PyLong_AsUnsignedLongLong(arg);
    if (t == (unsigned long long)-1 && PyErr_Occurred()) return NULL;
    ((FastObject *)o)->tid = (unsigned long)t;
    Py_RETURN_NONE;
}

static PyObject *fast_close(PyObject *o, PyObject *unused) {
    ((FastObject *)o)->closed = 1;
    Py_RETURN_NONE;
}

/* refill() -> (token, offset, length, seq) | status: the next record, taken, from
 * the prefetch, refilled first by one gf_pop_batch when it is empty (the Python
 * path's refill, with its consumer lock held); else the gf_pop_batch status.
 * One call, so no other thread takes the record in between. */
static PyObject *fast_refill(PyObject *o, PyObject *unused) {
    FastObject *self = (FastObject *)o;
    if (!self->c || self->fork_gen != g_fork_gen) return PyLong_FromLong(GF_E_ARG);
    if (self->pf_pos >= self->pf_n) {
        uint64_t outs[3];
        int rc = gf_pop_batch(self->c, FAST_PF_MAX, self->pf_bytes, 1, 0, self->offs, self->lens, self->seqs,
                              &outs[0], &outs[1], &outs[2]);
        if (rc != GF_OK) return PyLong_FromLong(rc);
        if (outs[0] == 0 || outs[0] > FAST_PF_MAX) return PyLong_FromLong(GF_E_CORRUPT);
        self->pf_n = (Py_ssize_t)outs[0];
        self->pf_pos = 0;
        self->pf_token = outs[1];
    }
    Py_ssize_t i = self->pf_pos++;
    unsigned long long token = self->pf_token++;
    return Py_BuildValue("(KKKK)", token, (unsigned long long)self->offs[i], (unsigned long long)self->lens[i],
                         (unsigned long long)self->seqs[i]);
}

static PyObject *fast_iternext(PyObject *o) {
    FastObject *self = (FastObject *)o;
    if (self->pf_pos >= self->pf_n) return NULL; /* StopIteration */
    Py_ssize_t i = self->pf_pos++;
    unsigned long long token = self->pf_token++;
    return Py_BuildValue("(KKKK)", token, (unsigned long long)self->offs[i], (unsigned long long)self->lens[i],
                         (unsigned long long)self->seqs[i]);
}

static PyObject *fast_iter(PyObject *o) { return Py_NewRef(o); }

/* take(k) -> (first_token, offsets, lengths, seqs) of the next min(k, pending) records, or None */
static PyObject *fast_take(PyObject *o, PyObject *arg) {
    FastObject *self = (FastObject *)o;
    Py_ssize_t k = PyLong_AsSsize_t(arg);
    if (k == -1 && PyErr_Occurred()) return NULL;
    Py_ssize_t have = self->pf_n - self->pf_pos;
    if (k > have) k = have;
    if (k <= 0) Py_RETURN_NONE;
    PyObject *lo = PyList_New(k), *ll = PyList_New(k), *ls = PyList_New(k);
    if (!lo || !ll || !ls) goto fail;
    for (Py_ssize_t j = 0; j < k; j++) {
        Py_ssize_t i = self->pf_pos + j;
        PyObject *a = PyLong_FromUnsignedLongLong(self->offs[i]);
        PyObject *b = PyLong_FromUnsignedLongLong(self->lens[i]);
        PyObject *c = PyLong_FromUnsignedLongLong(self->seqs[i]);
        if (!a || !b || !c) {
            Py_XDECREF(a);
            Py_XDECREF(b);
            Py_XDECREF(c);
            goto fail;
        }
        PyList_SetItem(lo, j, a);
        PyList_SetItem(ll, j, b);
        PyList_SetItem(ls, j, c);
    }
    unsigned long long first = self->pf_token;
    PyObject *r = Py_BuildValue("(KNNN)", first, lo, ll, ls);
    if (!r) return NULL; /* Py_BuildValue's N steals even on failure */
    self->pf_pos += k;
    self->pf_token += (unsigned long long)k;
    return r;
fail:
    Py_XDECREF(lo);
    Py_XDECREF(ll);
    Py_XDECREF(ls);
    return NULL;
}

static PyObject *fast_get_pending(PyObject *o, void *unused) {
    FastObject *self = (FastObject *)o;
    return PyLong_FromSsize_t(self->pf_n - self->pf_pos);
}

/* Fast(typed): typed (the queue has a dtype): pushes always take the Python path */
static PyObject *fast_new(PyTypeObject *tp, PyObject *args, PyObject *kw) {
    int typed;
    if (!PyArg_ParseTuple(args, "p", &typed)) return NULL;
    allocfunc alloc = (allocfunc)PyType_GetSlot(tp, Py_tp_alloc);
    FastObject *self = (FastObject *)alloc(tp, 0);
    if (!self) return NULL;
    /* alloc zeroes the object: every pointer is NULL */
    self->fork_gen = g_fork_gen;
    self->typed = typed;
    return (PyObject *)self;
}

static void fast_dealloc(PyObject *o) {
    FastObject *self = (FastObject *)o;
    PyTypeObject *tp = Py_TYPE(o);
    PyObject_GC_UnTrack(o);
    if (self->p) PyBuffer_Release(&self->pview);
    if (self->c) PyBuffer_Release(&self->cview);
    Py_CLEAR(self->ring);
    Py_CLEAR(self->plock);
    Py_CLEAR(self->res);
    Py_CLEAR(self->arr_descr);
    self->p = NULL;
    self->c = NULL;
    Py_CLEAR(self->rel);
    Py_CLEAR(self->item_type);
    Py_CLEAR(self->fmt);
    freefunc f = (freefunc)PyType_GetSlot(tp, Py_tp_free);
    f(o);
    Py_DECREF(tp);
}

static PyMethodDef fast_methods[] = {
    {"set_producer", fast_set_producer, METH_VARARGS, "set_producer(buffer of the handle's gf_producer, ring, plock)"},
    {"set_consumer", fast_set_consumer, METH_VARARGS,
     "set_consumer(consumer buffer, releaser, item type, address, capacity, format, itemsize, prefetch bytes, tid)"},
    {"set_array_dtype", fast_set_array_dtype, METH_O, "set_array_dtype(dtype): pop_array's element type"},
    {"note_thread", fast_note_thread, METH_O, "note_thread(tid): refills run natively from this thread (0: none)"},
    {"close", fast_close, METH_NOARGS, "Every call takes the Python path from now on."},
    {"refill", fast_refill, METH_NOARGS, "refill() -> the next record (refilled first when empty) | status"},
    {"take", fast_take, METH_O, "take(k) -> (first token, offsets, lengths, seqs) | None"},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef fast_getset[] = {
    {"pending", fast_get_pending, NULL, "prefetched records not handed out", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static int fast_traverse(PyObject *o, visitproc visit, void *arg) {
    FastObject *self = (FastObject *)o;
    Py_VISIT(Py_TYPE(o)); /* a heap type's instances hold it */
    Py_VISIT(self->res);
    Py_VISIT(self->ring);
    Py_VISIT((PyObject *)self->plock);
    Py_VISIT((PyObject *)self->rel);
    Py_VISIT((PyObject *)self->item_type);
    Py_VISIT(self->fmt);
    Py_VISIT((PyObject *)self->arr_descr);
    return 0;
}

static int fast_clear(PyObject *o) {
    FastObject *self = (FastObject *)o;
    Py_CLEAR(self->res);
    return 0;
}

static PyType_Slot fast_slots[] = {
    {Py_tp_traverse, fast_traverse},
    {Py_tp_clear, fast_clear},
    {Py_tp_doc, "The single-item hot path of a mapped queue handle (private: see native/gf_item.c)."},
    {Py_tp_new, fast_new},
    {Py_tp_dealloc, fast_dealloc},
    {Py_tp_methods, fast_methods},
    {Py_tp_getset, fast_getset},
    {Py_tp_iter, fast_iter},
    {Py_tp_iternext, fast_iternext},
    {0, NULL},
};

static PyType_Spec fast_spec = {
    .name = "grafos_fabric._item.Fast",
    .basicsize = sizeof(FastObject),
    .itemsize = 0,
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .slots = fast_slots,
};

/* QueueBase(*args, **kw): the arguments are FabricQueue.__init__'s */
static PyObject *qb_new(PyTypeObject *tp, PyObject *args, PyObject *kw) {
    allocfunc alloc = (allocfunc)PyType_GetSlot(tp, Py_tp_alloc);
    QueueBaseObject *self = (QueueBaseObject *)alloc(tp, 0); /* zeroed: no Fast yet */
    return (PyObject *)self;
}

static int qb_traverse(PyObject *o, visitproc visit, void *arg) {
    Py_VISIT(Py_TYPE(o)); /* a heap type's instances hold it (subtype_traverse leaves it to a heap base) */
    Py_VISIT((PyObject *)((QueueBaseObject *)o)->fast);
    return 0;
}

static int qb_clear(PyObject *o) {
    Py_CLEAR(((QueueBaseObject *)o)->fast);
    return 0;
}

static PyObject *qb_get_reserver(PyObject *o, void *unused) {
    QueueBaseObject *self = (QueueBaseObject *)o;
    if (!self->have_reserver) Py_RETURN_NONE;
    return PyLong_FromUnsignedLong(self->reserver);
}
static int qb_set_reserver(PyObject *o, PyObject *v, void *unused) {
    QueueBaseObject *self = (QueueBaseObject *)o;
    if (!v || v == Py_None) {
        self->have_reserver = 0;
        return 0;
    }
    unsigned long t = PyLong_Check(v) ? PyLong_AsUnsignedLong(v) : (unsigned long)-1;
    if (t == (unsigned long)-1 && (!PyLong_Check(v) || PyErr_Occurred())) {
        PyErr_Clear();
        PyErr_SetString(PyExc_TypeError, "_reserver is a thread id (threading.get_ident()) or None");
        return -1;
    }
    self->reserver = t;
    self->have_reserver = 1;
    return 0;
}
static PyObject *qb_get_reserving(PyObject *o, void *unused) { return PyBool_FromLong(((QueueBaseObject *)o)->reserving); }
static int qb_set_reserving(PyObject *o, PyObject *v, void *unused) {
    int t = v ? PyObject_IsTrue(v) : 0;
    if (t < 0) return -1;
    ((QueueBaseObject *)o)->reserving = t;
    return 0;
}
static PyObject *qb_get_gbar(PyObject *o, void *unused) {
    return PyBool_FromLong(((QueueBaseObject *)o)->give_back_after_reserve);
}
static int qb_set_gbar(PyObject *o, PyObject *v, void *unused) {
    int t = v ? PyObject_IsTrue(v) : 0;
    if (t < 0) return -1;
    ((QueueBaseObject *)o)->give_back_after_reserve = t;
    return 0;
}
static PyObject *qb_get_commit_len(PyObject *o, void *unused) {
    return PyLong_FromSsize_t(((QueueBaseObject *)o)->commit_len);
}
static int qb_set_commit_len(PyObject *o, PyObject *v, void *unused) {
    Py_ssize_t n = v ? PyLong_AsSsize_t(v) : 0;
    if (n == -1 && PyErr_Occurred()) return -1;
    ((QueueBaseObject *)o)->commit_len = n;
    return 0;
}
static PyObject *qb_get_last_seq(PyObject *o, void *unused) {
    QueueBaseObject *self = (QueueBaseObject *)o;
    if (self->last_seq) return Py_NewRef(self->last_seq);
    return self->have_seq ? PyLong_FromUnsignedLongLong(self->last_seq_raw) : PyLong_FromLong(-1);
}
static int qb_set_last_seq(PyObject *o, PyObject *v, void *unused) {
    QueueBaseObject *self = (QueueBaseObject *)o;
    if (v && !PyLong_Check(v)) {
        PyErr_SetString(PyExc_TypeError, "last_seq is an int");
        return -1;
    }
    PyObject *old = self->last_seq;
    self->last_seq = v ? Py_NewRef(v) : NULL;
    self->have_seq = 0;
    Py_XDECREF(old);
    return 0;
}

static PyGetSetDef qb_getset[] = {
    {"_reserver", qb_get_reserver, qb_set_reserver, "the thread whose reservation is open, or None", NULL},
    {"_reserving", qb_get_reserving, qb_set_reserving, "a reservation is open", NULL},
    {"_give_back_after_reserve", qb_get_gbar, qb_set_gbar, "close() came during a reservation", NULL},
    {"_commit_len", qb_get_commit_len, qb_set_commit_len, "bytes the open reservation publishes", NULL},
    {"last_seq", qb_get_last_seq, qb_set_last_seq, "sequence number of the last item reserved here (-1: none)",
     NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

/* ----------------------------------------------------------- Reservation */

/* What q.reserve(n) returns on the fast path: `with q.reserve(n) as buf:` enters
 * (one gf_reserve under the handle's producer lock, which stays held until the
 * exit, as the Python reservation holds it) and hands out buf = ring[off:off+n],
 * a writable slice of the data area array (it pins the mapping); the exit
 * commits (q._commit_len bytes: commit_len() may shrink it) or aborts (the block
 * raised), and sets q.last_seq. When the ring is full, or anything else is not
 * the common case, __enter__ hands the whole reservation to the Python one
 * (q._slow_reserve(n, timeout)), which waits, raises, and exits as always. */
typedef struct {
    PyObject_HEAD
    PyObject *q;        /* while armed or entered: the handle (its Fast is the one used) */
    PyObject *timeout;
    PyObject *slow;     /* the Python reservation this one handed over to, while entered */
    PyObject *m_enter;  /* this reservation's bound __enter__ / __exit__, made once (see ResSlot) */
    PyObject *m_exit;
    PyObject *views[2]; /* the last two views handed out, reused when nothing else holds them (res_view) */
    int view_flags[2];  /* their numpy flags as made */
    Py_ssize_t nbytes;
    int armed;
    int active;
} ResObject;

static PyTypeObject *g_res_type;
static PyTypeObject *g_res_slot_type;
static PyArray_Descr *g_u8_descr; /* numpy's uint8 descriptor (set at import) */
static PyObject *g_str_slow_reserve, *g_str_raise, *g_str_after_reserve, *g_str_commit, *g_str_enter, *g_str_exit;

static void res_disarm(ResObject *self) {
    self->armed = 0;
    Py_CLEAR(self->q);
    Py_CLEAR(self->timeout);
}

/* The view of an entered reservation: ring[off:off + nbytes] (the caller checked it
 * lies inside), a writable uint8 array whose base is the ring array, which pins the
 * mapping. One of the last two views this reservation handed out is handed out
 * again, pointed at the new bytes, when nothing but this reservation holds it (no
 * reference, no view or buffer export of it, no weak reference: nobody can see it
 * change) and it is still exactly as made (shape, strides, dtype, flags, base). Two,
 * because in a loop `with q.reserve(n) as buf:` the name still holds the previous
 * one while the next is entered. Else a new one is made (what numpy's slicing makes,
 * without parsing a slice) and replaces one that is not free. New reference or NULL. */
static PyObject *res_view(ResObject *self, FastObject *f, uint64_t off) {
    for (int i = 0; i < 2; i++) {
        PyObject *v = self->views[i];
        if (!v || Py_REFCNT(v) != 1 || !Py_IS_TYPE(v, &PyArray_Type)) continue;
        PyArrayObject *a = (PyArrayObject *)v;
        if (PyArray_NDIM(a) == 1 && PyArray_DIM(a, 0) == (npy_intp)self->nbytes && PyArray_STRIDE(a, 0) == 1 &&
            PyArray_DESCR(a) == g_u8_descr && PyArray_FLAGS(a) == self->view_flags[i] &&
            PyArray_BASE(a) == f->ring && ((PyArrayObject_fields *)a)->weakreflist == NULL) {
            ((PyArrayObject_fields *)a)->data = f->ring_data + off;
            return Py_NewRef(v);
        }
    }
    npy_intp dims[1] = {(npy_intp)self->nbytes};
    Py_INCREF((PyObject *)g_u8_descr);
    PyObject *v = PyArray_NewFromDescr(&PyArray_Type, g_u8_descr, 1, dims, NULL, f->ring_data + off,
                                       NPY_ARRAY_CARRAY, NULL); /* steals the descriptor's reference */
    if (v && PyArray_SetBaseObject((PyArrayObject *)v, Py_NewRef(f->ring)) < 0) /* steals the ring's (also on failure) */
        Py_CLEAR(v);
    if (!v) return NULL;
    /* kept in a free place, else in place of one held elsewhere (so not reusable now) */
    int i = !self->views[0] ? 0 : !self->views[1] ? 1 : Py_REFCNT(self->views[0]) == 1 ? 0 : 1;
    PyObject *old = self->views[i];
    self->views[i] = Py_NewRef(v);
    self->view_flags[i] = PyArray_FLAGS((PyArrayObject *)v);
    Py_XDECREF(old);
    return v;
}

static PyObject *res_enter(PyObject *o, PyObject *unused) {
    ResObject *self = (ResObject *)o;
    if (!self->armed || self->active) {
        PyErr_SetString(g_released_exc, "enter a reservation once, right after q.reserve(n): `with q.reserve(n) as buf:`");
        return NULL;
    }
    self->armed = 0;
    PyObject *q = self->q;
    FastObject *f = ((QueueBaseObject *)q)->fast; /* held by q, which this holds until the exit */
    uint64_t off = 0;
    int rc = GF_E_ARG;
    if (f && !fast_off(f) && f->p) {
        if (plock_acquire_c(f->plock) < 0) { /* a signal handler raised while it waited */
            res_disarm(self);
            return NULL;
        }
        rc = gf_reserve(f->p, (uint64_t)self->nbytes, 0, &off);
        if (rc == GF_OK && (off > f->ring_len || (uint64_t)self->nbytes > f->ring_len - off)) {
            gf_abort(f->p); /* never from the native layer; refuse rather than hand out a view past the ring */
            rc = GF_E_CORRUPT;
        }
        if (rc != GF_OK) (void)plock_release_c(f->plock); /* held here: never fails */
    }
    if (rc != GF_OK) {
        /* full, an error, a closed or forked handle: the Python reservation does it all */
        PyObject *n = PyLong_FromSsize_t(self->nbytes);
        PyObject *slow = n ? PyObject_CallMethodObjArgs(q, g_str_slow_reserve, n, self->timeout, NULL) : NULL;
        Py_XDECREF(n);
        res_disarm(self);
        if (!slow) return NULL;
        PyObject *v = PyObject_CallMethodObjArgs(slow, g_str_enter, NULL);
        if (!v) {
            Py_DECREF(slow);
            return NULL;
        }
        self->slow = slow;
        self->active = 1;
        return v;
    }
    QueueBaseObject *qb = (QueueBaseObject *)q;
    PyObject *v = res_view(self, f, off); /* ring[off:off + nbytes], checked above to lie inside it */
    if (!v) {
        gf_abort(f->p);
        (void)plock_release_c(f->plock); /* held here: never fails (the error set stays) */
        res_disarm(self);
        return NULL;
    }
    qb->reserver = PyThread_get_thread_ident(); /* the thread that entered */
    qb->have_reserver = 1;
    qb->reserving = 1;
    qb->commit_len = self->nbytes;
    self->active = 1;
    return v; /* q stays held until the exit */
}

static PyObject *res_exit(PyObject *o, PyObject *const *args, Py_ssize_t nargs) {
    ResObject *self = (ResObject *)o;
    PyObject *et = nargs > 0 ? args[0] : Py_None;
    if (!self->active) Py_RETURN_NONE;
    self->active = 0;
    if (self->slow) {
        PyObject *slow = self->slow;
        self->slow = NULL;
        PyObject *ex = PyObject_GetAttr(slow, g_str_exit);
        PyObject *r = ex ? PyObject_CallFunctionObjArgs(ex, nargs > 0 ? args[0] : Py_None, nargs > 1 ? args[1] : Py_None,
                                                        nargs > 2 ? args[2] : Py_None, NULL)
                         : NULL;
        Py_XDECREF(ex);
        Py_DECREF(slow);
        return r;
    }
    QueueBaseObject *qb = (QueueBaseObject *)self->q;
    FastObject *f = qb->fast; /* the one entered with: q's Fast never changes once bound */
    PyObject *q = self->q;
    self->q = NULL; /* ours now: dropped below */
    if (!f || !f->p) { /* only in a collector's teardown (q's Fast cleared): nothing to commit into */
        Py_XDECREF(q);
        Py_RETURN_NONE;
    }
    PyObject *err = NULL;
    uint64_t seq = 0;
    int rc = GF_OK;
    if (et != Py_None) {
        gf_abort(f->p);
    } else {
        Py_ssize_t k = qb->commit_len;
        rc = (k <= 0 || k > self->nbytes) ? GF_E_ARG : gf_commit(f->p, (uint64_t)k, &seq);
        if (rc == GF_OK) {
            Py_CLEAR(qb->last_seq); /* a sequence number is any u64: an int only when asked for */
            qb->last_seq_raw = seq;
            qb->have_seq = 1;
        }
    }
    qb->reserving = 0;
    qb->have_reserver = 0;
    if (rc != GF_OK) {
        /* the typed error (q._raise), with the lock still held as the Python path does */
        PyObject *n = PyLong_FromLong(rc);
        err = n ? PyObject_CallMethodObjArgs(q, g_str_raise, n, g_str_commit, NULL) : NULL;
        Py_XDECREF(n);
        Py_XDECREF(err);
        err = NULL;
    }
    PyObject *exc_t = NULL, *exc_v = NULL, *exc_tb = NULL;
    PyErr_Fetch(&exc_t, &exc_v, &exc_tb);
    if (qb->give_back_after_reserve) { /* close() came during the block: give the role back now */
        PyObject *r = PyObject_CallMethodObjArgs(q, g_str_after_reserve, NULL);
        if (!r) PyErr_WriteUnraisable(q);
        Py_XDECREF(r);
    }
    if (plock_release_c(f->plock) < 0) PyErr_WriteUnraisable(q); /* held since the enter: never */
    PyErr_Restore(exc_t, exc_v, exc_tb);
    if (f->res != o) { /* a one-off (the cached one was busy): no cycle through its bound methods */
        Py_CLEAR(self->m_enter); /* (the call running now holds the one it runs) */
        Py_CLEAR(self->m_exit);
        Py_CLEAR(self->views[0]);
        Py_CLEAR(self->views[1]);
    }
    Py_DECREF(q);
    if (PyErr_Occurred()) return NULL;
    Py_RETURN_NONE;
}

static int res_traverse(PyObject *o, visitproc visit, void *arg) {
    ResObject *self = (ResObject *)o;
    Py_VISIT(Py_TYPE(o));
    Py_VISIT(self->q);
    Py_VISIT(self->timeout);
    Py_VISIT(self->slow);
    Py_VISIT(self->m_enter);
    Py_VISIT(self->m_exit);
    Py_VISIT(self->views[0]);
    Py_VISIT(self->views[1]);
    return 0;
}

static int res_clear(PyObject *o) {
    ResObject *self = (ResObject *)o;
    Py_CLEAR(self->q);
    Py_CLEAR(self->timeout);
    Py_CLEAR(self->slow);
    Py_CLEAR(self->m_enter);
    Py_CLEAR(self->m_exit);
    Py_CLEAR(self->views[0]);
    Py_CLEAR(self->views[1]);
    return 0;
}

/* gf_item.h */
void gf_item_gc_dealloc(PyObject *o, inquiry clear) {
    PyTypeObject *tp = Py_TYPE(o);
    PyObject_GC_UnTrack(o);
    clear(o);
    freefunc f = (freefunc)PyType_GetSlot(tp, Py_tp_free);
    f(o);
    Py_DECREF(tp);
}

static void res_dealloc(PyObject *o) { gf_item_gc_dealloc(o, res_clear); }

static PyMethodDef res_enter_def = {"__enter__", res_enter, METH_NOARGS, NULL};
static PyMethodDef res_exit_def = {"__exit__", (PyCFunction)(void (*)(void))res_exit, METH_FASTCALL, NULL};

static PyType_Slot res_slots[] = {
    {Py_tp_doc, "`with q.reserve(n) as buf:` on a mapped handle (see FabricQueue.reserve)."},
    {Py_tp_dealloc, res_dealloc},
    {Py_tp_traverse, res_traverse},
    {Py_tp_clear, res_clear},
    {0, NULL},
};

/* ResSlot: Reservation.__enter__ and .__exit__. The with statement looks both up on
 * every entry (BEFORE_WITH: _PyObject_LookupSpecial), and a method descriptor would
 * make a new bound method each time (two allocations, two GC-tracked frees, and the
 * collections they bring on). This descriptor hands out the reservation's own bound
 * method, made on first use and kept (the cached reservation is reused, so after
 * its first use a `with` allocates nothing here). */
typedef struct {
    PyObject_HEAD
    int which; /* 0: __enter__, 1: __exit__ */
} ResSlotObject;

static PyObject *res_slot_get(PyObject *self, PyObject *obj, PyObject *type) {
    if (!obj || obj == Py_None || !PyObject_TypeCheck(obj, g_res_type)) return Py_NewRef(self); /* on the class */
    ResObject *r = (ResObject *)obj;
    int which = ((ResSlotObject *)self)->which;
    PyObject **slot = which ? &r->m_exit : &r->m_enter;
    if (!*slot) {
        *slot = PyCFunction_New(which ? &res_exit_def : &res_enter_def, obj);
        if (!*slot) return NULL;
    }
    return Py_NewRef(*slot);
}

/* Reservation.__enter__(r) / Reservation.__exit__(r, et, ev, tb) looked up on the class
 * (contextlib.ExitStack does): the descriptor called with the reservation first */
static PyObject *res_slot_call(PyObject *self, PyObject *args, PyObject *kw) {
    Py_ssize_t n = PyTuple_Size(args);
    if (n < 0) return NULL;
    PyObject *obj = n > 0 ? PyTuple_GetItem(args, 0) : NULL;
    if (!obj || !PyObject_TypeCheck(obj, g_res_type) || (kw && PyDict_Size(kw) != 0)) {
        PyErr_SetString(PyExc_TypeError, "Reservation.__enter__/__exit__ take a Reservation first (no keywords)");
        return NULL;
    }
    if (((ResSlotObject *)self)->which == 0) {
        if (n != 1) {
            PyErr_SetString(PyExc_TypeError, "Reservation.__enter__ takes no arguments");
            return NULL;
        }
        return res_enter(obj, NULL);
    }
    PyObject *rest[3] = {NULL, NULL, NULL};
    if (n > 4) {
        PyErr_SetString(PyExc_TypeError, "Reservation.__exit__ takes (exc_type, exc, tb)");
        return NULL;
    }
    for (Py_ssize_t i = 1; i < n; i++) rest[i - 1] = PyTuple_GetItem(args, i); /* borrowed, held by args */
    return res_exit(obj, rest, n - 1);
}

static void res_slot_dealloc(PyObject *o) {
    PyTypeObject *tp = Py_TYPE(o);
    freefunc f = (freefunc)PyType_GetSlot(tp, Py_tp_free);
    f(o);
    Py_DECREF(tp);
}

static PyType_Slot res_slot_slots[] = {
    {Py_tp_doc, "Reservation.__enter__ / __exit__: the reservation's bound method, made once (private)."},
    {Py_tp_descr_get, res_slot_get},
    {Py_tp_call, res_slot_call},
    {Py_tp_dealloc, res_slot_dealloc},
    {0, NULL},
};

static PyType_Spec res_slot_spec = {
    .name = "grafos_fabric._item.ResSlot",
    .basicsize = sizeof(ResSlotObject),
    .itemsize = 0,
    .flags = Py_TPFLAGS_DEFAULT,
    .slots = res_slot_slots,
};

/* Reservation.__enter__ / __exit__ as ResSlot descriptors; 0, or -1 with an error set */
static int res_add_slots(PyTypeObject *res_type) {
    PyObject *st = PyType_FromSpec(&res_slot_spec);
    if (!st) return -1;
    g_res_slot_type = (PyTypeObject *)st; /* kept for the module's life (its instances hold it too) */
    static const char *names[2] = {"__enter__", "__exit__"};
    for (int which = 0; which < 2; which++) {
        allocfunc alloc = (allocfunc)PyType_GetSlot(g_res_slot_type, Py_tp_alloc);
        ResSlotObject *d = (ResSlotObject *)alloc(g_res_slot_type, 0);
        if (!d) return -1;
        d->which = which;
        int rc = PyObject_SetAttrString((PyObject *)res_type, names[which], (PyObject *)d);
        Py_DECREF(d);
        if (rc < 0) return -1;
    }
    return 0;
}

static PyType_Spec res_spec = {
    .name = "grafos_fabric._item.Reservation",
    .basicsize = sizeof(ResObject),
    .itemsize = 0,
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .slots = res_slots,
};

/* q.reserve(nbytes, timeout=None): the Reservation (armed) on the fast path, else
 * q._slow_reserve(nbytes, timeout) */
static PyObject *qb_reserve(PyObject *q, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames) {
    FastObject *f = ((QueueBaseObject *)q)->fast;
    PyObject *nb, *timeout;
    if (fast_args(args, nargs, kwnames, 1, &nb, &timeout) < 0) return NULL;
    if (!timeout) timeout = Py_None;
    Py_ssize_t n = PyLong_CheckExact(nb) ? PyLong_AsSsize_t(nb) : -1;
    if (n == -1) PyErr_Clear();
    if (!f || fast_off(f) || !f->p || f->typed || n <= 0 || (uint64_t)n > f->max_item || !fast_timeout_ok(timeout))
        return PyObject_CallMethodObjArgs(q, g_str_slow_reserve, nb, timeout, NULL);
    ResObject *r = (ResObject *)f->res;
    /* the cached one, when not in use anywhere: held only by the Fast and its own bound
     * methods, which nobody else holds either */
    if (r && !r->armed && !r->active && (!r->m_enter || Py_REFCNT(r->m_enter) == 1) &&
        (!r->m_exit || Py_REFCNT(r->m_exit) == 1) &&
        Py_REFCNT((PyObject *)r) == 1 + (r->m_enter != NULL) + (r->m_exit != NULL)) {
        Py_INCREF((PyObject *)r);
    } else {
        allocfunc alloc = (allocfunc)PyType_GetSlot(g_res_type, Py_tp_alloc);
        r = (ResObject *)alloc(g_res_type, 0);
        if (!r) return NULL;
        if (!f->res) f->res = Py_NewRef((PyObject *)r);
    }
    r->q = Py_NewRef(q);
    r->timeout = Py_NewRef(timeout);
    r->nbytes = n;
    r->armed = 1;
    return (PyObject *)r;
}



static void qb_dealloc(PyObject *o) {
    PyTypeObject *tp = Py_TYPE(o);
    PyObject_GC_UnTrack(o);
    Py_CLEAR(((QueueBaseObject *)o)->fast);
    Py_CLEAR(((QueueBaseObject *)o)->last_seq);
    freefunc f = (freefunc)PyType_GetSlot(tp, Py_tp_free);
    f(o);
    Py_DECREF(tp);
}

/* _fast_bind(fast | None) */
static PyObject *qb_fast_bind(PyObject *o, PyObject *arg) {
    if (arg != Py_None && !PyObject_TypeCheck(arg, g_fast_type)) {
        PyErr_SetString(PyExc_TypeError, "_fast_bind needs a Fast or None");
        return NULL;
    }
    QueueBaseObject *self = (QueueBaseObject *)o;
    if (self->fast) { /* bound once: a reservation relies on it staying */
        PyErr_SetString(PyExc_ValueError, "_fast_bind: a Fast is bound already");
        return NULL;
    }
    self->fast = arg == Py_None ? NULL : (FastObject *)Py_NewRef(arg);
    Py_RETURN_NONE;
}

static PyMethodDef qb_methods[] = {
    {"push", (PyCFunction)(void (*)(void))qb_push, METH_FASTCALL | METH_KEYWORDS,
     "push(buf, timeout=None) -> seq: push one item, waiting for space; TimeoutError when timeout seconds pass "
     "first."},
    {"try_push", qb_try_push, METH_O, "try_push(buf) -> bool: push one item; False when the ring is full (never "
     "waits)."},
    {"pop", (PyCFunction)(void (*)(void))qb_pop, METH_FASTCALL | METH_KEYWORDS,
     "pop(timeout=None) -> Item: pop one item, waiting for it; TimeoutError when timeout passes."},
    {"pop_array", (PyCFunction)(void (*)(void))qb_pop_array, METH_FASTCALL | METH_KEYWORDS,
     "pop_array(timeout=None) -> ndarray: pop one item as a read-only array of the queue's dtype (uint8 without "
     "one); its ring space is reused once that array and every view of it are gone."},
    {"try_pop", qb_try_pop, METH_NOARGS,
     "try_pop() -> Item | None: pop one item, or None when the queue is empty (never waits)."},
    {"reserve", (PyCFunction)(void (*)(void))qb_reserve, METH_FASTCALL | METH_KEYWORDS,
     "reserve(nbytes, timeout=None): zero-copy production (see FabricQueue._slow_reserve for the whole story): "
     "`with q.reserve(n) as buf: buf[:] = ...` publishes the item on exit, aborts it when the block raises."},
    {"_fast_bind", qb_fast_bind, METH_O, "_fast_bind(fast): the native state the methods above use (once)."},
    {NULL, NULL, 0, NULL},
};

static PyType_Slot qb_slots[] = {
    {Py_tp_doc, "Base of FabricQueue: its single-item calls in C (private: see native/gf_item.c)."},
    {Py_tp_new, qb_new},
    {Py_tp_dealloc, qb_dealloc},
    {Py_tp_traverse, qb_traverse},
    {Py_tp_clear, qb_clear},
    {Py_tp_methods, qb_methods},
    {Py_tp_getset, qb_getset},
    {0, NULL},
};

static PyType_Spec qb_spec = {
    .name = "grafos_fabric._item.QueueBase",
    .basicsize = sizeof(QueueBaseObject),
    .itemsize = 0,
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .slots = qb_slots,
};

/* bind(released_exc, corrupted_exc): the typed errors (once, at import) */
static PyObject *mod_bind(PyObject *mod, PyObject *args) {
    PyObject *rel, *cor;
    if (!PyArg_ParseTuple(args, "OO", &rel, &cor)) return NULL;
    Py_XDECREF(g_released_exc);
    g_released_exc = Py_NewRef(rel);
    Py_XDECREF(g_corrupted_exc);
    g_corrupted_exc = Py_NewRef(cor);
    Py_RETURN_NONE;
}

static PyMethodDef mod_methods[] = {
    {"bind", mod_bind, METH_VARARGS, "bind(released_exc, corrupted_exc): the typed errors, once at import."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef moddef = {
    PyModuleDef_HEAD_INIT, "grafos_fabric._item", "Base type of a popped item (see native/gf_item.c).", -1,
    mod_methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__item(void) {
    g_str_release_token = PyUnicode_InternFromString("_release_token");
    g_str_item_info = PyUnicode_InternFromString("_item_info");
    g_str_span = PyUnicode_InternFromString("_span");
    g_str_slow_push = PyUnicode_InternFromString("_slow_push");
    g_str_slow_try_push = PyUnicode_InternFromString("_slow_try_push");
    g_str_slow_pop = PyUnicode_InternFromString("_slow_pop");
    g_str_slow_try_pop = PyUnicode_InternFromString("_slow_try_pop");
    g_str_slow_pop_array = PyUnicode_InternFromString("_slow_pop_array");
    g_str_timeout = PyUnicode_InternFromString("timeout");
    g_str_slow_reserve = PyUnicode_InternFromString("_slow_reserve");
    g_str_raise = PyUnicode_InternFromString("_raise");
    g_str_after_reserve = PyUnicode_InternFromString("_give_back_after_fast_reserve");
    g_str_commit = PyUnicode_InternFromString("commit");
    g_str_enter = PyUnicode_InternFromString("__enter__");
    g_str_exit = PyUnicode_InternFromString("__exit__");
    if (!g_str_slow_reserve || !g_str_raise || !g_str_after_reserve || !g_str_commit || !g_str_enter || !g_str_exit)
        return NULL;
    if (!g_str_release_token || !g_str_item_info || !g_str_span || !g_str_slow_push || !g_str_slow_try_push ||
        !g_str_slow_pop || !g_str_slow_try_pop || !g_str_slow_pop_array || !g_str_timeout)
        return NULL;
    g_released_exc = Py_NewRef(PyExc_ValueError);
    g_corrupted_exc = Py_NewRef(PyExc_ValueError);
    import_array1(NULL); /* numpy's C API table (raises ImportError if numpy is missing or too old) */
    g_u8_descr = PyArray_DescrFromType(NPY_UINT8);
    if (!g_u8_descr) return NULL;
    PyObject *m = PyModule_Create(&moddef);
    if (!m) return NULL;
    PyObject *tp = PyType_FromSpec(&item_spec);
    if (!tp || PyModule_AddObject(m, "ItemBase", tp) < 0) {
        Py_XDECREF(tp);
        Py_DECREF(m);
        return NULL;
    }
    g_item_type = tp; /* the module's reference keeps it */
    PyObject *rt = PyType_FromSpec(&releaser_spec);
    if (!rt || PyModule_AddObject(m, "Releaser", Py_NewRef(rt)) < 0) {
        Py_XDECREF(rt);
        Py_DECREF(m);
        return NULL;
    }
    g_releaser_type = (PyTypeObject *)rt; /* the module's reference keeps it, and this one */
    if (PyModule_AddIntConstant(m, "GF_NATIVE_ABI", GF_NATIVE_ABI) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    if (pthread_atfork(NULL, NULL, after_fork_in_child) != 0) {
        PyErr_SetString(PyExc_OSError, "pthread_atfork failed");
        Py_DECREF(m);
        return NULL;
    }
    PyObject *ft = PyType_FromSpec(&fast_spec);
    if (!ft || PyModule_AddObject(m, "Fast", ft) < 0) {
        Py_XDECREF(ft);
        Py_DECREF(m);
        return NULL;
    }
    g_fast_type = (PyTypeObject *)ft;
    PyObject *rt2 = PyType_FromSpec(&res_spec);
    if (!rt2 || PyModule_AddObject(m, "Reservation", rt2) < 0) {
        Py_XDECREF(rt2);
        Py_DECREF(m);
        return NULL;
    }
    g_res_type = (PyTypeObject *)rt2;
    if (res_add_slots(g_res_type) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    PyObject *pl = PyType_FromSpec(&plock_spec);
    if (!pl || PyModule_AddObject(m, "PLock", pl) < 0) {
        Py_XDECREF(pl);
        Py_DECREF(m);
        return NULL;
    }
    g_plock_type = (PyTypeObject *)pl;
    if (gf_ckpt_init(m) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    PyObject *qt = PyType_FromSpec(&qb_spec);
    if (!qt || PyModule_AddObject(m, "QueueBase", qt) < 0) {
        Py_XDECREF(qt);
        Py_DECREF(m);
        return NULL;
    }
    PyObject *sp = PyType_FromSpec(&span_spec);
    if (!sp || PyModule_AddObject(m, "Span", sp) < 0) {
        Py_XDECREF(sp);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
