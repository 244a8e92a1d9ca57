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
 */
#ifndef Py_LIMITED_API
#define Py_LIMITED_API 0x030B0000
#endif
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <stdint.h>
#include <pthread.h>

#include "gf_native.h" /* gf_consumer and gf_release: gf_native.c is compiled into this module too */

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
    if (!g_str_release_token || !g_str_item_info || !g_str_span) return NULL;
    g_released_exc = Py_NewRef(PyExc_ValueError);
    g_corrupted_exc = Py_NewRef(PyExc_ValueError);
    PyObject *m = PyModule_Create(&moddef);
    if (!m) return NULL;
    PyObject *tp = PyType_FromSpec(&item_spec);
    if (!tp || PyModule_AddObject(m, "ItemBase", tp) < 0) {
        Py_XDECREF(tp);
        Py_DECREF(m);
        return NULL;
    }
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
    PyObject *sp = PyType_FromSpec(&span_spec);
    if (!sp || PyModule_AddObject(m, "Span", sp) < 0) {
        Py_XDECREF(sp);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
