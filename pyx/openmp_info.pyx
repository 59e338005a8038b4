"""What the OpenMP runtime the kernels were built with says (through omp_shim only)."""
from omp_shim cimport NORMCORE_HAVE_OPENMP, omp_get_max_threads


def openmp_enabled():
    """True when the kernels were compiled with OpenMP."""
    return bool(NORMCORE_HAVE_OPENMP)


def max_threads():
    """omp_get_max_threads() of the calling thread: follows OMP_NUM_THREADS and the limits
    threadpoolctl sets; 1 in a serial build."""
    return omp_get_max_threads()
