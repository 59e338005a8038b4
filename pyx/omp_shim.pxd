# The only place OpenMP's runtime functions are declared. Without OpenMP (_OPENMP undefined)
# the shim answers as a one-thread runtime, so the kernels build and run serially.
cdef extern from *:
    """
    #ifdef _OPENMP
    #include <omp.h>
    #define NORMCORE_HAVE_OPENMP 1
    #else
    #define NORMCORE_HAVE_OPENMP 0
    static inline int omp_get_max_threads(void) { return 1; }
    #endif
    """
    const int NORMCORE_HAVE_OPENMP
    int omp_get_max_threads() noexcept nogil
