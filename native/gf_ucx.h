/* grafos_fabric._ucx: the C side of the UCX driver (see gf_ucx.c). */
#ifndef GF_UCX_H
#define GF_UCX_H
#include <stddef.h>
#include <stdint.h>

#define GFU_OK 0
#define GFU_DISCONNECTED (-1)   /* endpoint error (peer gone, connection reset) */
#define GFU_UNSUPPORTED (-5)
#define GFU_TIMEOUT (-8)        /* deadline passed; the endpoint was force-closed */
#define GFU_ERROR (-9)          /* a local failure (bad argument, out of memory, UCX refused) */
#define GFU_CLOSED (-10)        /* the endpoint was closed before the call */
#define GFU_ABI_VERSION 1

typedef struct gfu_ctx gfu_ctx;
typedef struct gfu_ep gfu_ep;
typedef struct gfu_mem gfu_mem;
typedef struct gfu_rkey gfu_rkey;
typedef struct gfu_listener gfu_listener;
typedef struct gfu_group gfu_group;

#include "gf_ucx_api.h"
#endif
