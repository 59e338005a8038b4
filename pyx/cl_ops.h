/* Channels-last arithmetic (included by pyx/channels_last.pxi): x of one sample is a matrix
 * [L][C] with the C channels of a position contiguous, so the per-(sample, channel) sums are
 * column sums, vectorised across the channels.
 *
 * A chunk is at most NC_CL_CHUNK consecutive positions of one sample. Its column sums are
 * taken NC_CL_ROWS rows at a time, ((r0 + r1) + (r2 + r3)) per column, then the rest of the
 * chunk row by row; each column's arithmetic is the same whatever the vector width, and the
 * chunks of a sample are merged in order (Chan's formula for moments): the result depends
 * neither on the thread count nor on the ISA.
 *   moments: shifted by the chunk's first value of the column (an element of the chunk, the
 *   same bound as row_ops.h's blocks); mean = k + S/n, M2 = Q - S^2/n.
 *   gradient sums: sum(dy), sum(dy * (x - center)).
 * Apply: forward in the array type with the float64 center split in two parts of it (as
 * row_ops.h); backward in double, rounded once.
 */
#ifndef NORMCORE_CL_OPS_H
#define NORMCORE_CL_OPS_H

#include <stddef.h>

#include "dispatch.h"

#define NC_CL_CHUNK 256
#define NC_CL_ROWS 4

#define NC_TEMPLATE "cl_ops_impl.h"
#include "for_each_type.h"
#undef NC_TEMPLATE

#endif
