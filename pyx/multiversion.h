/* NC_MULTIVERSION: compile a kernel function three times, for AVX-512, AVX2 and the baseline
 * ISA, and let the loader pick one (ifunc, GCC on x86-64 Linux). All versions give the same
 * bits when the arithmetic is element-wise IEEE in a fixed order (+, *, /, sqrt, conversions
 * are correctly rounded) and the sums use a fixed number of lanes (row_ops.h): setup.py
 * compiles with -ffp-contract=off, so no variant fuses a multiply and an add into an FMA.
 * Elsewhere the functions are compiled once, for the compiler's target. */
#ifndef NORMCORE_MULTIVERSION_H
#define NORMCORE_MULTIVERSION_H

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define NC_MULTIVERSION __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define NC_MULTIVERSION
#endif

#endif
