/* Compiles the template NC_TEMPLATE (a file name) for the element type set by the includer
 * (T, NC_SFX and whatever else the template reads) once per instruction set, then binds its
 * entry points (dispatch.h). No include guard: included once per template and type. */
#include "dispatch.h"

#if NC_MULTI_ISA
#define NC_ISA base
#include NC_TEMPLATE
#undef NC_ISA

#pragma GCC push_options
#pragma GCC target("avx2")
#define NC_ISA avx2
#include NC_TEMPLATE
#undef NC_ISA
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq")
#define NC_ISA avx512
#include NC_TEMPLATE
#undef NC_ISA
#pragma GCC pop_options

#define NC_DISPATCH_PASS 1
#include NC_TEMPLATE
#undef NC_DISPATCH_PASS
#else
#include NC_TEMPLATE
#define NC_DISPATCH_PASS 1
#include NC_TEMPLATE
#undef NC_DISPATCH_PASS
#endif
