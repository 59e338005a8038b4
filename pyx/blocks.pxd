# Inline per-block work shared by the kernels. A block is at most BLOCK contiguous elements
# of one row; all sums are float64, with four independent accumulators so the compiler can
# keep several additions in flight (and vectorise them) without reordering a single sum.
from fused_types cimport floating


cdef inline void block_moments(const floating* x, Py_ssize_t n,
                               double* mean, double* m2) noexcept nogil:
    """Mean and M2 = sum((x - mean)^2) of x[0:n], n >= 1 (OUT: mean, m2).

    Pass 1 sums x shifted by its first element; pass 2 (the block is in cache) sums the
    squared deviations from that mean and applies the corrected two-pass formula, which
    also corrects the mean. No E[x^2] - E[x]^2 anywhere.
    """
    cdef Py_ssize_t i, n4 = n - n % 4
    cdef double k = x[0]
    cdef double s0 = 0.0, s1 = 0.0, s2 = 0.0, s3 = 0.0
    cdef double q0 = 0.0, q1 = 0.0, q2 = 0.0, q3 = 0.0
    cdef double d0, d1, d2, d3, mu, c, q
    for i in range(0, n4, 4):
        s0 += <double>x[i] - k
        s1 += <double>x[i + 1] - k
        s2 += <double>x[i + 2] - k
        s3 += <double>x[i + 3] - k
    for i in range(n4, n):
        s0 += <double>x[i] - k
    mu = k + ((s0 + s1) + (s2 + s3)) / n
    s0 = 0.0; s1 = 0.0; s2 = 0.0; s3 = 0.0
    for i in range(0, n4, 4):
        d0 = <double>x[i] - mu
        d1 = <double>x[i + 1] - mu
        d2 = <double>x[i + 2] - mu
        d3 = <double>x[i + 3] - mu
        s0 += d0
        s1 += d1
        s2 += d2
        s3 += d3
        q0 += d0 * d0
        q1 += d1 * d1
        q2 += d2 * d2
        q3 += d3 * d3
    for i in range(n4, n):
        d0 = <double>x[i] - mu
        s0 += d0
        q0 += d0 * d0
    c = (s0 + s1) + (s2 + s3)
    q = (q0 + q1) + (q2 + q3)
    mean[0] = mu + c / n
    q = q - c * c / n
    m2[0] = q if q > 0.0 else 0.0


cdef inline void merge_block_moments(const double* parts, Py_ssize_t nb, Py_ssize_t length,
                                     Py_ssize_t block, double* mean, double* m2) noexcept nogil:
    """Merge nb consecutive (mean, M2) pairs of blocks of `block` elements (the last one holds
    the rest of `length`) in block order with Chan's formula (OUT: mean, m2)."""
    cdef Py_ssize_t b
    cdef double na = <double>(block if length > block else length)
    cdef double mu = parts[0], q = parts[1]
    cdef double nb_, n, delta
    for b in range(1, nb):
        nb_ = <double>(length - b * block if length - b * block < block else block)
        n = na + nb_
        delta = parts[2 * b] - mu
        mu = mu + delta * (nb_ / n)
        q = q + parts[2 * b + 1] + delta * delta * (na * nb_ / n)
        na = n
    mean[0] = mu
    m2[0] = q


cdef inline void block_grad_sums(const floating* x, const floating* dy, Py_ssize_t n,
                                 double center, double* sum_dy, double* sum_dy_xc) noexcept nogil:
    """sum(dy) and sum(dy * (x - center)) over n elements, in float64 (OUT: the two sums)."""
    cdef Py_ssize_t i, n4 = n - n % 4
    cdef double s0 = 0.0, s1 = 0.0, s2 = 0.0, s3 = 0.0
    cdef double t0 = 0.0, t1 = 0.0, t2 = 0.0, t3 = 0.0
    cdef double g0, g1, g2, g3
    for i in range(0, n4, 4):
        g0 = dy[i]
        g1 = dy[i + 1]
        g2 = dy[i + 2]
        g3 = dy[i + 3]
        s0 += g0
        s1 += g1
        s2 += g2
        s3 += g3
        t0 += g0 * (<double>x[i] - center)
        t1 += g1 * (<double>x[i + 1] - center)
        t2 += g2 * (<double>x[i + 2] - center)
        t3 += g3 * (<double>x[i + 3] - center)
    for i in range(n4, n):
        g0 = dy[i]
        s0 += g0
        t0 += g0 * (<double>x[i] - center)
    sum_dy[0] = (s0 + s1) + (s2 + s3)
    sum_dy_xc[0] = (t0 + t1) + (t2 + t3)


cdef inline void block_grad_sums_weighted(const floating* x, const floating* dy,
                                          const floating* w, Py_ssize_t n, double center,
                                          double* sum_wdy, double* sum_wdy_xc) noexcept nogil:
    """sum(w * dy) and sum(w * dy * (x - center)) over n elements (w: per-column weight)."""
    cdef Py_ssize_t i, n4 = n - n % 4
    cdef double s0 = 0.0, s1 = 0.0, s2 = 0.0, s3 = 0.0
    cdef double t0 = 0.0, t1 = 0.0, t2 = 0.0, t3 = 0.0
    cdef double g0, g1, g2, g3
    for i in range(0, n4, 4):
        g0 = <double>w[i] * dy[i]
        g1 = <double>w[i + 1] * dy[i + 1]
        g2 = <double>w[i + 2] * dy[i + 2]
        g3 = <double>w[i + 3] * dy[i + 3]
        s0 += g0
        s1 += g1
        s2 += g2
        s3 += g3
        t0 += g0 * (<double>x[i] - center)
        t1 += g1 * (<double>x[i + 1] - center)
        t2 += g2 * (<double>x[i + 2] - center)
        t3 += g3 * (<double>x[i + 3] - center)
    for i in range(n4, n):
        g0 = <double>w[i] * dy[i]
        s0 += g0
        t0 += g0 * (<double>x[i] - center)
    sum_wdy[0] = (s0 + s1) + (s2 + s3)
    sum_wdy_xc[0] = (t0 + t1) + (t2 + t3)


cdef inline void split_center(double center, floating* hi, floating* lo) noexcept nogil:
    """center = hi + lo to about twice the precision of `floating`, so that
    (x - hi) - lo is the difference x - center rounded once (Sterbenz makes x - hi exact
    when x is near the center): a constant row normalises to exactly its shift."""
    hi[0] = <floating>center
    lo[0] = <floating>(center - <double>hi[0])
