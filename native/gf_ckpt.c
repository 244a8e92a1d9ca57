/*
 * gf_ckpt.c: CheckpointedStageState.checkpoint() in C (grafos_fabric._item.checkpoint), compiled
 * into grafos_fabric._item with gf_item.c and gf_crc.c (whose gf_lane_write it calls directly).
 *
 * Why C: a 4 KiB single-sync checkpoint is one ~90 us device write, and the Python method around
 * its one native call cost 2.6-2.8 us of wall time over that call made bare from a loop (the
 * checks below, the lock, cffi's argument conversion); in C the method takes 1.3-1.6 us of CPU
 * less, and 2.1-2.6 us less with the state's attributes read from CheckpointBase's struct
 * (below), measured interleaved in one process (README "Checkpoint speed", "checkpoint() in
 * C"), and another 0.5-0.6 us less with the slot store's newest (slot, seq) read and set in
 * SlotStoreBase's struct (below; "Where a 4 KiB checkpoint's time goes"), the lease cell's in
 * LeaseCellBase's. This is the same method, line for line, with the same lock: where it cannot
 * take the lane (no lane, an observer or metrics, another stage or edge type, the lease not
 * active, another codec, a changed state that the lane cannot take) it calls the Python methods
 * that did the rest before: state._checkpoint_lane(edge), state._retake(), state._failed(...).
 *
 *   checkpoint(state, edge) -> seq
 *
 * The state's own attributes (state, edge, stage, codec, observer, last_seq, _fast, _lock) are
 * read and set in its CheckpointBase struct when it is a CheckpointedStageState itself, by name
 * on a subclass's object. state._lock must be a grafos_fabric._item.PLock (taken and given back
 * here, around all of it, exceptions included). state._fast, when not None, is the tuple the Python side makes
 * (checkpoint.py, _make_lane): (write, c, cell, store, data, stage, lane), where lane is a
 * LaneRef over the cffi buffer of the lane's struct gf_lane. When write is the native
 * gf_lane_write registered by setup(), the call goes straight to gf_lane_write on that struct
 * with the GIL released (as cffi's own call does); any other callable is called as the Python
 * side would (a test puts one there to land a close between the checks and the write).
 *
 * Nothing here reads shared memory or disk: every value comes from Python objects, each checked
 * for its type and range before use (a value out of range takes the Python path, which says why).
 * A LaneRef is trusted to be over a lane that drivers.block.RecordLane filled (as cffi trusts a
 * pointer cast): it checks the buffer's size and alignment, and gf_lane_write the lane's shape.
 */
#ifndef Py_LIMITED_API
#define Py_LIMITED_API 0x030B0000
#endif
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stddef.h>
#include <stdint.h>
#include <structmember.h>

#include "gf_crc.h"
#include "gf_item.h"

/* setup(): EdgeCheckpoint (the exact type the lane takes), LeaseState.ACTIVE, the observe module's
 * dict (its _current: metrics on), the native gf_lane_write as cffi exposes it (lib.gf_lane_write),
 * "raw", GF_LANE_AGAIN as a Python int */
static PyObject *g_edge_type, *g_active, *g_observe_dict, *g_native_write, *g_raw;
static PyObject *s_lock, *s_fast, *s_observer, *s_current, *s_edge, *s_newest, *s_stage, *s_state_attr, *s_codec,
    *s_cstate, *s_deadline, *s_input_offset, *s_output_commit, *s_last_seq, *s_checkpoint_lane, *s_retake, *s_failed;

/* ---- LaneRef: the address of a struct gf_lane, from the cffi buffer over it ---- */

typedef struct {
    PyObject_HEAD
    Py_buffer view; /* holds the exporter (cffi's buffer, which holds the lane's cdata) */
    int held;
} LaneRefObject;

static PyTypeObject *g_laneref_type;

static PyObject *laneref_new(PyTypeObject *tp, PyObject *args, PyObject *kw) {
    PyObject *buf;
    if (kw && PyDict_Size(kw) != 0) {
        PyErr_SetString(PyExc_TypeError, "LaneRef() takes no keyword arguments");
        return NULL;
    }
    if (!PyArg_ParseTuple(args, "O:LaneRef", &buf)) return NULL;
    allocfunc alloc = (allocfunc)PyType_GetSlot(tp, Py_tp_alloc);
    LaneRefObject *self = (LaneRefObject *)alloc(tp, 0);
    if (!self) return NULL;
    if (PyObject_GetBuffer(buf, &self->view, PyBUF_WRITABLE) < 0) {
        Py_DECREF(self);
        return NULL;
    }
    self->held = 1;
    if (self->view.len != (Py_ssize_t)sizeof(struct gf_lane) ||
        (uintptr_t)self->view.buf % _Alignof(struct gf_lane)) {
        PyErr_Format(PyExc_ValueError, "LaneRef takes the buffer of one struct gf_lane (%zu bytes, aligned)",
                     sizeof(struct gf_lane));
        Py_DECREF(self);
        return NULL;
    }
    return (PyObject *)self;
}

static void laneref_dealloc(PyObject *o) {
    LaneRefObject *self = (LaneRefObject *)o;
    PyTypeObject *tp = Py_TYPE(o);
    if (self->held) PyBuffer_Release(&self->view);
    self->held = 0;
    freefunc f = (freefunc)PyType_GetSlot(tp, Py_tp_free);
    f(o);
    Py_DECREF(tp);
}

static PyType_Slot laneref_slots[] = {
    {Py_tp_doc, "LaneRef(buffer): a record lane's struct gf_lane (checkpoint()'s native write), by its cffi buffer."},
    {Py_tp_new, laneref_new},
    {Py_tp_dealloc, laneref_dealloc},
    {0, NULL},
};

static PyType_Spec laneref_spec = {
    .name = "grafos_fabric._item.LaneRef",
    .basicsize = sizeof(LaneRefObject),
    .flags = Py_TPFLAGS_DEFAULT,
    .slots = laneref_slots,
};

/* ---- CheckpointBase: the attributes checkpoint() reads, in a struct ----
 *
 * CheckpointedStageState's base. Its state, edge, stage, codec, observer, last_seq, _fast and _lock
 * are members of this struct (Python reads and sets them as any attribute), so that checkpoint()
 * reads them without a dictionary lookup each: an attribute read from C after the I/O wait cost
 * about 150 ns (README "checkpoint() in C"). On an object of a subclass, which may make any of them
 * a property, checkpoint() reads them by name instead. */

typedef struct {
    PyObject_HEAD
    PyObject *state, *edge, *stage, *codec, *observer, *last_seq, *fast, *lock;
} CkptBaseObject;

static PyTypeObject *g_ckptbase_type; /* the base */
static PyObject *g_state_type;        /* CheckpointedStageState itself (checkpoint_setup) */

#define CKPT_MEMBER(name, field, doc) {name, T_OBJECT_EX, offsetof(CkptBaseObject, field), 0, doc}
static PyMemberDef ckptbase_members[] = {
    CKPT_MEMBER("state", state, "the stage's state"),
    CKPT_MEMBER("edge", edge, "the edge checkpoint the last checkpoint carried"),
    CKPT_MEMBER("stage", stage, "the stage's id"),
    CKPT_MEMBER("codec", codec, "how the state is encoded"),
    CKPT_MEMBER("observer", observer, "told when a checkpoint flush starts and ends (or None)"),
    CKPT_MEMBER("last_seq", last_seq, "the last checkpoint's slot sequence number (or None)"),
    CKPT_MEMBER("_fast", fast, "checkpoint()'s prepared lane call (or None)"),
    CKPT_MEMBER("_lock", lock, "checkpoint()'s lock (a PLock)"),
    {NULL, 0, 0, 0, NULL},
};

static int ckptbase_traverse(PyObject *o, visitproc visit, void *arg) {
    CkptBaseObject *self = (CkptBaseObject *)o;
    Py_VISIT(Py_TYPE(o));
    Py_VISIT(self->state);
    Py_VISIT(self->edge);
    Py_VISIT(self->stage);
    Py_VISIT(self->codec);
    Py_VISIT(self->observer);
    Py_VISIT(self->last_seq);
    Py_VISIT(self->fast);
    Py_VISIT(self->lock);
    return 0;
}

static int ckptbase_clear(PyObject *o) {
    CkptBaseObject *self = (CkptBaseObject *)o;
    Py_CLEAR(self->state);
    Py_CLEAR(self->edge);
    Py_CLEAR(self->stage);
    Py_CLEAR(self->codec);
    Py_CLEAR(self->observer);
    Py_CLEAR(self->last_seq);
    Py_CLEAR(self->fast);
    Py_CLEAR(self->lock);
    return 0;
}

static void ckptbase_dealloc(PyObject *o) { gf_item_gc_dealloc(o, ckptbase_clear); }

static PyType_Slot ckptbase_slots[] = {
    {Py_tp_doc, "CheckpointedStageState's base: the attributes checkpoint() reads, in C (private)."},
    {Py_tp_new, PyType_GenericNew},
    {Py_tp_members, ckptbase_members},
    {Py_tp_traverse, ckptbase_traverse},
    {Py_tp_clear, ckptbase_clear},
    {Py_tp_dealloc, ckptbase_dealloc},
    {0, NULL},
};

static PyType_Spec ckptbase_spec = {
    .name = "grafos_fabric._item.CheckpointBase",
    .basicsize = sizeof(CkptBaseObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .slots = ckptbase_slots,
};

/* ---- SlotStoreBase: SlotStore's newest (slot, seq), as two integers ---- */

/* SlotStore's _newest: None, (slot, seq), or (set from Python) any other object, which checkpoint()
 * does not take (the Python path says what is wrong with it). (slot, seq) lives in two integers, so
 * that a checkpoint reads and sets it without a tuple or a dict: a few words of the store's object,
 * where the dict, its keys and a tuple a checkpoint were memory touched cold after the I/O wait (a
 * scratch build without the store's newest at all took 680-950 fewer cycles a checkpoint, by TSC
 * stamps in checkpoint(); README "Checkpoint speed"). The tuple _newest reads as is made when
 * Python first reads it, and kept until it changes. */
enum { NEWEST_NONE, NEWEST_INTS, NEWEST_OBJ };

typedef struct {
    PyObject_HEAD
    PyObject *obj; /* NEWEST_OBJ: the object; NEWEST_INTS: the tuple, once made (or NULL) */
    int kind;
    uint32_t slot; /* NEWEST_INTS: 0 or 1 */
    uint64_t seq;  /* NEWEST_INTS: < 2**64 */
} StoreBaseObject;

static PyTypeObject *g_storebase_type; /* the base */
static PyObject *g_store_type;         /* SlotStore itself (checkpoint_setup) */
static PyObject *g_slot_no[2];         /* the ints 0 and 1 */

static void newest_set_ints(StoreBaseObject *b, uint32_t slot, uint64_t seq) {
    PyObject *old = b->obj;
    b->kind = NEWEST_INTS;
    b->slot = slot;
    b->seq = seq;
    b->obj = NULL;
    Py_XDECREF(old); /* last, the struct whole: Python may have set any object, whose dealloc runs code */
}

static void newest_set_none(StoreBaseObject *b) {
    PyObject *old = b->obj;
    b->kind = NEWEST_NONE;
    b->obj = NULL;
    Py_XDECREF(old);
}

/* _newest as Python reads it: a new reference, or NULL with an error set */
static PyObject *storebase_get_newest(PyObject *o, void *unused) {
    StoreBaseObject *b = (StoreBaseObject *)o;
    if (b->kind == NEWEST_NONE) Py_RETURN_NONE;
    if (!b->obj) { /* NEWEST_INTS, not made yet */
        PyObject *q = PyLong_FromUnsignedLongLong(b->seq);
        if (!q) return NULL;
        b->obj = PyTuple_Pack(2, g_slot_no[b->slot], q);
        Py_DECREF(q);
        if (!b->obj) return NULL;
    }
    return Py_NewRef(b->obj);
}

/* 1 when v is (0 or 1, an int in [0, 2**64)), both exact ints, with *slot and *seq set; else 0 */
static int newest_parse(PyObject *v, uint32_t *slot, uint64_t *seq) {
    if (!PyTuple_CheckExact(v) || PyTuple_Size(v) != 2) return 0;
    PyObject *a = PyTuple_GetItem(v, 0), *q = PyTuple_GetItem(v, 1);
    if (!a || !q || !PyLong_CheckExact(a) || !PyLong_CheckExact(q)) {
        PyErr_Clear();
        return 0;
    }
    long s = PyLong_AsLong(a);
    unsigned long long n = PyLong_AsUnsignedLongLong(q);
    if (PyErr_Occurred()) {
        PyErr_Clear();
        return 0;
    }
    if (s != 0 && s != 1) return 0;
    *slot = (uint32_t)s;
    *seq = (uint64_t)n;
    return 1;
}

static int storebase_set_newest(PyObject *o, PyObject *v, void *unused) {
    StoreBaseObject *b = (StoreBaseObject *)o;
    if (!v) {
        PyErr_SetString(PyExc_AttributeError, "_newest cannot be deleted (set it to None)");
        return -1;
    }
    uint32_t slot;
    uint64_t seq;
    PyObject *old = b->obj;
    if (v == Py_None) {
        b->kind = NEWEST_NONE;
        b->obj = NULL;
    } else if (newest_parse(v, &slot, &seq)) {
        b->kind = NEWEST_INTS;
        b->slot = slot;
        b->seq = seq;
        b->obj = Py_NewRef(v); /* _newest reads back as the very tuple set */
    } else {
        b->kind = NEWEST_OBJ;
        b->obj = Py_NewRef(v);
    }
    Py_XDECREF(old);
    return 0;
}

static PyGetSetDef storebase_getset[] = {
    {"_newest", storebase_get_newest, storebase_set_newest,
     "(slot, seq) of the newest valid record once known, else None", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static int storebase_traverse(PyObject *o, visitproc visit, void *arg) {
    Py_VISIT(Py_TYPE(o));
    Py_VISIT(((StoreBaseObject *)o)->obj);
    return 0;
}

static int storebase_clear(PyObject *o) {
    Py_CLEAR(((StoreBaseObject *)o)->obj);
    return 0;
}

static void storebase_dealloc(PyObject *o) { gf_item_gc_dealloc(o, storebase_clear); }

static PyType_Slot storebase_slots[] = {
    {Py_tp_doc, "SlotStore's base: its newest (slot, seq), which checkpoint() reads and sets, in C (private)."},
    {Py_tp_new, PyType_GenericNew},
    {Py_tp_getset, storebase_getset},
    {Py_tp_traverse, storebase_traverse},
    {Py_tp_clear, storebase_clear},
    {Py_tp_dealloc, storebase_dealloc},
    {0, NULL},
};

static PyType_Spec storebase_spec = {
    .name = "grafos_fabric._item.SlotStoreBase",
    .basicsize = sizeof(StoreBaseObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .slots = storebase_slots,
};

/* ---- LeaseCellBase: LocalLeaseCell's state and deadline ---- */

/* LocalLeaseCell's _state and _deadline as struct members, which checkpoint() reads without the
 * type and instance-dict lookups a Python attribute takes (its two reads took 580-600 cycles a
 * checkpoint, cold after the I/O wait: TSC stamps in checkpoint(), README "Checkpoint speed"). */
typedef struct {
    PyObject_HEAD
    PyObject *state, *deadline;
} CellBaseObject;

static PyTypeObject *g_cellbase_type; /* the base */
static PyObject *g_cell_type;         /* LocalLeaseCell itself (checkpoint_setup) */

static PyMemberDef cellbase_members[] = {
    {"_state", T_OBJECT_EX, offsetof(CellBaseObject, state), 0, "the lease's state (a LeaseState)"},
    {"_deadline", T_OBJECT_EX, offsetof(CellBaseObject, deadline), 0, "the lease's deadline, monotonic ns"},
    {NULL, 0, 0, 0, NULL},
};

static int cellbase_traverse(PyObject *o, visitproc visit, void *arg) {
    Py_VISIT(Py_TYPE(o));
    Py_VISIT(((CellBaseObject *)o)->state);
    Py_VISIT(((CellBaseObject *)o)->deadline);
    return 0;
}

static int cellbase_clear(PyObject *o) {
    Py_CLEAR(((CellBaseObject *)o)->state);
    Py_CLEAR(((CellBaseObject *)o)->deadline);
    return 0;
}

static void cellbase_dealloc(PyObject *o) { gf_item_gc_dealloc(o, cellbase_clear); }

static PyType_Slot cellbase_slots[] = {
    {Py_tp_doc, "LocalLeaseCell's base: the state and deadline checkpoint() reads, in C (private)."},
    {Py_tp_new, PyType_GenericNew},
    {Py_tp_members, cellbase_members},
    {Py_tp_traverse, cellbase_traverse},
    {Py_tp_clear, cellbase_clear},
    {Py_tp_dealloc, cellbase_dealloc},
    {0, NULL},
};

static PyType_Spec cellbase_spec = {
    .name = "grafos_fabric._item.LeaseCellBase",
    .basicsize = sizeof(CellBaseObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .slots = cellbase_slots,
};

/* o.<name>: the object member at offset `at` of o's C base (CheckpointBase, LeaseCellBase) when
 * o's type is `exact` itself (AttributeError when unset, as the member's read), else by name (a
 * subclass may make it a property). A new reference, or NULL with an error set. */
static PyObject *member_get(PyObject *o, PyObject *exact, size_t at, PyObject *name) {
    if ((PyObject *)Py_TYPE(o) != exact) return PyObject_GetAttr(o, name);
    PyObject *v = *(PyObject **)((char *)o + at);
    if (!v) {
        PyErr_SetObject(PyExc_AttributeError, name);
        return NULL;
    }
    return Py_NewRef(v);
}

/* a CheckpointedStageState's and a LocalLeaseCell's members */
#define ST_GET(st, f, name) member_get((st), g_state_type, offsetof(CkptBaseObject, f), (name))
#define CELL_GET(cell, f, name) member_get((cell), g_cell_type, offsetof(CellBaseObject, f), (name))

/* st.<name> = v: the struct member at offset `at` on a CheckpointedStageState itself, else by name;
 * 0 or -1. */
static int st_set(PyObject *st, size_t at, PyObject *name, PyObject *v) {
    if ((PyObject *)Py_TYPE(st) != g_state_type) return PyObject_SetAttr(st, name, v);
    PyObject **field = (PyObject **)((char *)st + at);
    PyObject *old = *field;
    *field = Py_NewRef(v);
    Py_XDECREF(old);
    return 0;
}

/* ---- checkpoint ---- */

#define NOT_TAKEN ((PyObject *)&g_not_taken) /* the fast path does not apply: state._checkpoint_lane(edge) */
static int g_not_taken;

/* 1: a is b or a == b; 0: not; -1: error */
static int same_or_equal(PyObject *a, PyObject *b) { return a == b ? 1 : PyObject_RichCompareBool(a, b, Py_EQ); }

/* A u64 from a Python int, or -1 with nothing set when it is not one (the Python path decides). */
static int as_u64(PyObject *v, uint64_t *out) {
    if (!PyLong_Check(v)) return -1;
    unsigned long long x = PyLong_AsUnsignedLongLong(v);
    if (x == (unsigned long long)-1 && PyErr_Occurred()) {
        PyErr_Clear();
        return -1;
    }
    *out = (uint64_t)x;
    return 0;
}

/* The fast path under the lock: a new reference (the result), NOT_TAKEN, or NULL with an error. */
static PyObject *ckpt_locked(PyObject *st, PyObject *edge) {
    PyObject *fast = ST_GET(st, fast, s_fast), *target = NULL, *newest = NULL, *res = NOT_TAKEN, *v;
    if (!fast) return NULL;
    if (fast == Py_None || !PyTuple_Check(fast) || PyTuple_Size(fast) != 7) goto out;
    if (!(v = ST_GET(st, observer, s_observer))) goto fail;
    Py_DECREF(v);
    if (v != Py_None) goto out;
    v = PyDict_GetItemWithError(g_observe_dict, s_current); /* borrowed */
    if (!v && PyErr_Occurred()) goto fail;
    if (v && v != Py_None) goto out;
    PyObject *write = PyTuple_GetItem(fast, 0), *c = PyTuple_GetItem(fast, 1), *cell = PyTuple_GetItem(fast, 2),
             *store = PyTuple_GetItem(fast, 3), *data = PyTuple_GetItem(fast, 4), *stage = PyTuple_GetItem(fast, 5),
             *lane = PyTuple_GetItem(fast, 6);
    if (!write || !c || !cell || !store || !data || !stage || !lane) goto fail;
    target = edge == Py_None ? ST_GET(st, edge, s_edge) : Py_NewRef(edge);
    if (!target) goto fail;
    /* newest: (slot, seq) as SlotStore keeps it, in its struct on a SlotStore itself (by name on a
     * subclass's object, which may make _newest a property); anything else takes the Python path */
    StoreBaseObject *sb = (PyObject *)Py_TYPE(store) == g_store_type ? (StoreBaseObject *)store : NULL;
    uint64_t last, was_slot, v0, v1;
    if (sb) {
        if (sb->kind != NEWEST_INTS) goto out;
        was_slot = sb->slot;
        last = sb->seq;
    } else {
        if (!(newest = PyObject_GetAttr(store, s_newest))) goto fail;
        if (!PyTuple_Check(newest) || PyTuple_Size(newest) != 2 ||
            as_u64(PyTuple_GetItem(newest, 0), &was_slot) < 0 || as_u64(PyTuple_GetItem(newest, 1), &last) < 0)
            goto out;
    }
    if (was_slot > 1 || last >= (uint64_t)INT64_MAX || (PyObject *)Py_TYPE(target) != g_edge_type) goto out;
    if (!(v = ST_GET(st, stage, s_stage))) goto fail;
    Py_DECREF(v);
    if (v != stage) goto out;
    if (!(v = CELL_GET(cell, state, s_cstate))) goto fail;
    int ok = same_or_equal(v, g_active);
    Py_DECREF(v);
    if (ok < 0) goto fail;
    if (!ok) goto out;
    if (!(v = ST_GET(st, codec, s_codec))) goto fail;
    ok = same_or_equal(v, g_raw);
    Py_DECREF(v);
    if (ok < 0) goto fail;
    if (!ok) goto out;
    if (!(v = ST_GET(st, state, s_state_attr))) goto fail;
    Py_DECREF(v);
    if (v != data) { /* a new state of the lane's length, maybe: _retake points the lane at it */
        if (!(v = PyObject_CallMethodObjArgs(st, s_retake, NULL))) goto fail;
        ok = PyObject_IsTrue(v);
        Py_DECREF(v);
        if (ok < 0) goto fail;
        if (!ok) goto out;
    }
    uint64_t seq = last + 1;
    uint32_t slot = (uint32_t)(1 - was_slot);
    PyObject *in = PyObject_GetAttr(target, s_input_offset);
    if (!in) goto fail;
    PyObject *oc = PyObject_GetAttr(target, s_output_commit);
    if (!oc) {
        Py_DECREF(in);
        goto fail;
    }
    ok = as_u64(in, &v0) == 0 && as_u64(oc, &v1) == 0;
    Py_DECREF(in);
    Py_DECREF(oc);
    if (!ok) goto out;
    if (!(v = CELL_GET(cell, deadline, s_deadline))) goto fail;
    long long deadline = PyLong_Check(v) ? PyLong_AsLongLong(v) : -1;
    Py_DECREF(v);
    if (deadline == -1 && PyErr_Occurred()) {
        PyErr_Clear();
        goto out;
    }
    int native = write == g_native_write;
    if (native && !PyObject_TypeCheck(lane, g_laneref_type)) {
        PyErr_SetString(PyExc_TypeError, "checkpoint: the lane's reference is not a LaneRef");
        goto fail;
    }
    /* The result (and on a store not a SlotStore itself, its next newest), made before the write,
     * not after it: after the I/O wait the allocator's memory is cold. Measured with TSC stamps in
     * this function: the two took 630-650 cycles after the write; made here, the part before the
     * write grew by 260-320 (README "Checkpoint speed"). */
    PyObject *s = PyLong_FromUnsignedLongLong(seq), *nw = NULL;
    if (!s) goto fail;
    if (!sb && !(nw = PyTuple_Pack(2, g_slot_no[slot], s))) goto fail_new;
    /* unknown until this write completes: a failure re-scans next time */
    if (sb)
        newest_set_none(sb);
    else if (PyObject_SetAttr(store, s_newest, Py_None) < 0)
        goto fail_new;
    int rc;
    if (native) {
        struct gf_lane *l = ((LaneRefObject *)lane)->view.buf;
        /* SYNC POINT: record durable (as SlotLane.write's: header and data in one durable write;
         * the reader's side is the two checksums in slots._examine) */
        Py_BEGIN_ALLOW_THREADS
        rc = gf_lane_write(l, seq, slot, v0, v1, (int64_t)deadline);
        Py_END_ALLOW_THREADS
    } else {
        PyObject *r = PyObject_CallFunction(write, "OKIKKL", c, (unsigned long long)seq, (unsigned int)slot,
                                            (unsigned long long)v0, (unsigned long long)v1, deadline);
        if (!r) goto fail_new;
        rc = (int)PyLong_AsLong(r);
        Py_DECREF(r);
        if (rc == -1 && PyErr_Occurred()) goto fail_new;
    }
    if (!rc) {
        if (sb)
            newest_set_ints(sb, slot, seq);
        else if (PyObject_SetAttr(store, s_newest, nw) < 0)
            goto fail_new;
        if (st_set(st, offsetof(CkptBaseObject, edge), s_edge, target) < 0 ||
            st_set(st, offsetof(CkptBaseObject, last_seq), s_last_seq, s) < 0)
            goto fail_new;
        Py_XDECREF(nw);
        res = s;
        goto out;
    }
    Py_XDECREF(nw);
    Py_DECREF(s);
    if (sb) {
        newest_set_ints(sb, (uint32_t)was_slot, last);
        if (rc != GF_LANE_AGAIN && !(newest = storebase_get_newest(store, NULL))) goto fail;
    } else if (PyObject_SetAttr(store, s_newest, newest) < 0) {
        goto fail;
    }
    if (rc != GF_LANE_AGAIN) { /* raises, or nothing was written (then the ordinary path) */
        PyObject *a = Py_BuildValue("(iOIKOO)", rc, newest, (unsigned int)slot, (unsigned long long)seq, edge, target);
        if (!a) goto fail;
        PyObject *m = PyObject_GetAttr(st, s_failed);
        res = m ? PyObject_Call(m, a, NULL) : NULL;
        Py_XDECREF(m);
        Py_DECREF(a);
    }
    goto out;
fail_new:
    Py_XDECREF(nw);
    Py_DECREF(s);
fail:
    res = NULL;
out:
    Py_XDECREF(newest);
    Py_XDECREF(target);
    Py_DECREF(fast);
    return res;
}

/* checkpoint(state, edge=None) -> seq: CheckpointedStageState.checkpoint (the module's text) */
static PyObject *ckpt_checkpoint(PyObject *mod, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs < 1 || nargs > 2) {
        PyErr_SetString(PyExc_TypeError, "checkpoint(state, edge=None)");
        return NULL;
    }
    if (!g_edge_type) {
        PyErr_SetString(PyExc_RuntimeError, "grafos_fabric._item.checkpoint before checkpoint_setup()");
        return NULL;
    }
    PyObject *st = args[0], *edge = nargs > 1 ? args[1] : Py_None;
    PyObject *lock = ST_GET(st, lock, s_lock);
    if (!lock) return NULL;
    if (!gf_item_is_plock(lock)) {
        Py_DECREF(lock);
        PyErr_SetString(PyExc_TypeError, "checkpoint: state._lock is not a grafos_fabric._item.PLock");
        return NULL;
    }
    if (gf_item_plock_acquire(lock) < 0) { /* one at a time (CheckpointedStageState.__init__) */
        Py_DECREF(lock);
        return NULL;
    }
    PyObject *res = ckpt_locked(st, edge);
    if (res == NOT_TAKEN) res = PyObject_CallMethodObjArgs(st, s_checkpoint_lane, edge, NULL);
    PyObject *et = NULL, *ev = NULL, *tb = NULL;
    if (!res) PyErr_Fetch(&et, &ev, &tb); /* the lock goes back whatever happened, the error stays */
    if (gf_item_plock_release(lock) < 0) { /* not held here: cannot happen (taken above, reentrant) */
        Py_XDECREF(res);
        res = NULL;
        Py_XDECREF(et);
        Py_XDECREF(ev);
        Py_XDECREF(tb);
    } else if (et) {
        PyErr_Restore(et, ev, tb);
    }
    Py_DECREF(lock);
    return res;
}

/* checkpoint_setup(CheckpointedStageState, EdgeCheckpoint, LeaseState.ACTIVE, observe module,
 * lib.gf_lane_write, SlotStore) */
static PyObject *ckpt_setup(PyObject *mod, PyObject *args) {
    PyObject *state_type, *edge_type, *active, *observe, *write, *store_type, *cell_type;
    if (!PyArg_ParseTuple(args, "OOOOOOO:checkpoint_setup", &state_type, &edge_type, &active, &observe, &write,
                          &store_type, &cell_type))
        return NULL;
    if (!PyType_Check(state_type) || !PyType_IsSubtype((PyTypeObject *)state_type, g_ckptbase_type) ||
        !PyType_Check(edge_type) || !PyModule_Check(observe) || !PyType_Check(store_type) ||
        !PyType_IsSubtype((PyTypeObject *)store_type, g_storebase_type) || !PyType_Check(cell_type) ||
        !PyType_IsSubtype((PyTypeObject *)cell_type, g_cellbase_type)) {
        PyErr_SetString(PyExc_TypeError,
                        "checkpoint_setup(CheckpointedStageState (a CheckpointBase), EdgeCheckpoint, "
                        "LeaseState.ACTIVE, observe, lib.gf_lane_write, SlotStore (a SlotStoreBase), "
                        "LocalLeaseCell (a LeaseCellBase))");
        return NULL;
    }
    PyObject *d = PyModule_GetDict(observe); /* borrowed */
    if (!d) return NULL;
    PyObject *old[7] = {g_state_type, g_edge_type, g_active, g_observe_dict, g_native_write, g_store_type, g_cell_type};
    g_state_type = Py_NewRef(state_type);
    g_edge_type = Py_NewRef(edge_type);
    g_active = Py_NewRef(active);
    g_observe_dict = Py_NewRef(d);
    g_native_write = Py_NewRef(write);
    g_store_type = Py_NewRef(store_type);
    g_cell_type = Py_NewRef(cell_type);
    for (int i = 0; i < 7; i++) Py_XDECREF(old[i]);
    Py_RETURN_NONE;
}

static PyMethodDef ckpt_methods[] = {
    {"checkpoint", (PyCFunction)(void (*)(void))ckpt_checkpoint, METH_FASTCALL,
     "checkpoint(state, edge=None) -> seq: CheckpointedStageState.checkpoint, its fast path in C."},
    {"checkpoint_setup", ckpt_setup, METH_VARARGS,
     "checkpoint_setup(CheckpointedStageState, EdgeCheckpoint, LeaseState.ACTIVE, observe, lib.gf_lane_write, "
     "SlotStore, LocalLeaseCell): "
     "what checkpoint() compares with."},
    {NULL, NULL, 0, NULL},
};

int gf_ckpt_init(PyObject *m) {
    static const char *const names[] = {"_lock", "_fast", "observer", "_current", "edge", "_newest", "stage",
                                        "state", "codec", "_state", "_deadline", "input_offset", "output_commit",
                                        "last_seq", "_checkpoint_lane", "_retake", "_failed", "raw"};
    PyObject **slots[] = {&s_lock, &s_fast, &s_observer, &s_current, &s_edge, &s_newest, &s_stage,
                          &s_state_attr, &s_codec, &s_cstate, &s_deadline, &s_input_offset, &s_output_commit,
                          &s_last_seq, &s_checkpoint_lane, &s_retake, &s_failed, &g_raw};
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++)
        if (!(*slots[i] = PyUnicode_InternFromString(names[i]))) return -1;
    for (int i = 0; i < 2; i++)
        if (!(g_slot_no[i] = PyLong_FromLong(i))) return -1;
    PyObject *tp = PyType_FromSpec(&laneref_spec);
    if (!tp || PyModule_AddObject(m, "LaneRef", Py_NewRef(tp)) < 0) {
        Py_XDECREF(tp);
        return -1;
    }
    g_laneref_type = (PyTypeObject *)tp; /* and the module's reference */
    PyObject *bt = PyType_FromSpec(&ckptbase_spec);
    if (!bt || PyModule_AddObject(m, "CheckpointBase", Py_NewRef(bt)) < 0) {
        Py_XDECREF(bt);
        return -1;
    }
    g_ckptbase_type = (PyTypeObject *)bt;
    PyObject *sbt = PyType_FromSpec(&storebase_spec);
    if (!sbt || PyModule_AddObject(m, "SlotStoreBase", Py_NewRef(sbt)) < 0) {
        Py_XDECREF(sbt);
        return -1;
    }
    g_storebase_type = (PyTypeObject *)sbt;
    PyObject *cbt = PyType_FromSpec(&cellbase_spec);
    if (!cbt || PyModule_AddObject(m, "LeaseCellBase", Py_NewRef(cbt)) < 0) {
        Py_XDECREF(cbt);
        return -1;
    }
    g_cellbase_type = (PyTypeObject *)cbt;
    return PyModule_AddFunctions(m, ckpt_methods);
}
