/* gf_item.h: what grafos_fabric._item's two C files share (gf_item.c, gf_ckpt.c). */
#ifndef GF_ITEM_H
#define GF_ITEM_H

/* PLock (gf_item.c): whether o is one, and its acquire/release as the methods do them
 * (0, or -1 with an error set). */
int gf_item_is_plock(PyObject *o);
int gf_item_plock_acquire(PyObject *o);
int gf_item_plock_release(PyObject *o);

/* The dealloc of a GC-tracked heap type whose members clear drops (gf_item.c's reservation, gf_ckpt.c's
 * three C bases). */
void gf_item_gc_dealloc(PyObject *o, inquiry clear);

/* gf_ckpt.c: adds LaneRef, CheckpointBase, SlotStoreBase, checkpoint and checkpoint_setup to the module;
 * 0, or -1 with an error set. */
int gf_ckpt_init(PyObject *m);

#endif
