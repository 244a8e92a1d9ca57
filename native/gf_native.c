#include "gf_native.h"
