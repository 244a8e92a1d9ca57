/* grafos_fabric._ucx: the C side of the UCX driver (see gf_ucx.c); its API is gf_ucx_api.h. */
#ifndef GF_UCX_H
#define GF_UCX_H
#include <stddef.h>
#include <stdint.h>

#include "gf_ucx_api.h"
#endif
