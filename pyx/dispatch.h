/* The one instruction-set dispatch of normcore's kernels.
 *
 * Every kernel template (row_ops_impl.h, channel_ops_impl.h, cl_ops_impl.h, lrn_chunk_impl.h)
 * is plain C, compiled once per instruction set by for_each_isa.h: the baseline of the target,
 * AVX2 and AVX-512 (F, VL, BW and DQ: with VL the 256-bit code has 32 registers, which the
 * 16-lane sums need; x86-64 Linux with GCC; elsewhere the baseline only). A template names its
 * functions NC_NAME(f), which gives f the element type's suffix and the instruction set's
 * (nc_apply_rows_f32_avx2), and ends with a list of its entry points, NC_DISPATCH(f) each: the
 * name the callers use (nc_apply_rows_f32) then resolves to one variant when the module is
 * loaded (an ifunc), by the CPU and by NORMCORE_ISA.
 *
 * NORMCORE_ISA=baseline|avx2|avx512 caps the variant (the tests run every variant this way);
 * a cap above what the CPU has, or an unknown word, leaves the best the CPU has
 * (normcore._kernels.openmp_info.instruction_set() says which one runs; the Python package warns
 * about an unknown word). Every variant gives the same bits: the arithmetic is element-wise
 * IEEE in a fixed order, sums use a fixed number of lanes (row_ops.h), and setup.py compiles
 * with -ffp-contract=off, so no variant fuses a multiply and an add into an FMA.
 */
#ifndef NORMCORE_DISPATCH_H
#define NORMCORE_DISPATCH_H

#include <stdlib.h>
#include <string.h>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define NC_MULTI_ISA 1
#else
#define NC_MULTI_ISA 0
#endif

enum { NC_ISA_BASELINE = 0, NC_ISA_AVX2 = 1, NC_ISA_AVX512 = 2 };

/* The best variant this CPU can run. */
static inline int nc_isa_cpu_best(void)
{
#if NC_MULTI_ISA
    __builtin_cpu_init(); /* resolvers run before the constructors that would do it */
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq"))
        return NC_ISA_AVX512;
    return __builtin_cpu_supports("avx2") ? NC_ISA_AVX2 : NC_ISA_BASELINE;
#else
    return NC_ISA_BASELINE;
#endif
}

/* The variant to run: the best the CPU has, capped by NORMCORE_ISA. */
static inline int nc_isa_level(void)
{
    int level = nc_isa_cpu_best();
    const char *cap = getenv("NORMCORE_ISA");
    if (cap && cap[0]) {
        const int want = strcmp(cap, "baseline") == 0 ? NC_ISA_BASELINE
                       : strcmp(cap, "avx2") == 0     ? NC_ISA_AVX2
                       : strcmp(cap, "avx512") == 0   ? NC_ISA_AVX512
                                                      : level;
        if (want < level)
            level = want;
    }
    return level;
}

#define NC_CAT2_(a, b) a##_##b
#define NC_CAT2(a, b) NC_CAT2_(a, b)
#define NC_CAT3_(a, b, c) a##_##b##_##c
#define NC_CAT3(a, b, c) NC_CAT3_(a, b, c)
#define NC_STR_(a) #a
#define NC_STR(a) NC_STR_(a)

/* f with the element type's suffix: a dispatched entry point, or a helper common to all ISAs */
#define NC_TYPED(f) NC_CAT2(f, NC_SFX)
#if NC_MULTI_ISA
/* f of this element type and instruction set, inside a template */
#define NC_NAME(f) NC_CAT3(f, NC_SFX, NC_ISA)
#define NC_VARIANT(f, isa) NC_CAT3(f, NC_SFX, isa)
/* f of the element type suffix sfx and this instruction set (a template's other variant) */
#define NC_NAME_AS(f, sfx) NC_CAT3(f, sfx, NC_ISA)
/* NC_TYPED(f): the variant of f that nc_isa_level() picks, bound when the module is loaded. */
#define NC_DISPATCH(f)                                                                       \
    static __typeof__(NC_VARIANT(f, base)) *NC_VARIANT(f, resolve)(void)                     \
    {                                                                                        \
        switch (nc_isa_level()) {                                                            \
        case NC_ISA_AVX512: return NC_VARIANT(f, avx512);                                  \
        case NC_ISA_AVX2: return NC_VARIANT(f, avx2);                                        \
        default: return NC_VARIANT(f, base);                                                 \
        }                                                                                    \
    }                                                                                        \
    static __typeof__(NC_VARIANT(f, base)) NC_TYPED(f)                                       \
        __attribute__((ifunc(NC_STR(NC_VARIANT(f, resolve)))));
#else
/* one variant: the template's functions carry the entry points' own names */
#define NC_NAME(f) NC_TYPED(f)
#define NC_NAME_AS(f, sfx) NC_CAT2(f, sfx)
#define NC_DISPATCH(f)
#endif

/* An entry point of a template: callers reach it through its dispatched name (a template may
 * also call another variant of the same instruction set directly: LRN's float fallback). */
#define NC_ENTRY static

#endif
