"""What the kernels were built with: the OpenMP runtime (through omp_shim only) and the
instruction set their entry points run (dispatch.h)."""
from omp_shim cimport NORMCORE_HAVE_OPENMP, omp_get_max_threads

cdef extern from "dispatch.h" nogil:
    int nc_isa_level()
    int nc_isa_cpu_best()

ISA_NAMES = ("baseline", "avx2", "avx512")


def openmp_enabled():
    """True when the kernels were compiled with OpenMP."""
    return bool(NORMCORE_HAVE_OPENMP)


def max_threads():
    """omp_get_max_threads() of the calling thread: follows OMP_NUM_THREADS and the limits
    threadpoolctl sets; 1 in a serial build."""
    return omp_get_max_threads()


def instruction_set():
    """The instruction set the kernels' entry points run: "baseline", "avx2" or "avx512",
    the best the CPU has, capped by NORMCORE_ISA (dispatch.h); every one gives the same bits."""
    return ISA_NAMES[nc_isa_level()]


def instruction_sets():
    """The instruction sets this build has variants for that this CPU can run, lowest first
    (only "baseline" where the build has one variant: dispatch.h)."""
    return list(ISA_NAMES[:nc_isa_cpu_best() + 1])
