/* Compiles the template NC_TEMPLATE (a file name) for float (suffix f32) and double (f64), each
 * for every instruction set (for_each_isa.h). No include guard: included once per template. */
#define T float
#define NC_SFX f32
#include "for_each_isa.h"
#undef T
#undef NC_SFX
#define T double
#define NC_SFX f64
#include "for_each_isa.h"
#undef T
#undef NC_SFX
