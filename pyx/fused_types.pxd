# The floating types every kernel is specialised for. Statistics are always accumulated in
# float64 whatever the input type; this fused type is the type of the arrays (x, dy, y, dx).
ctypedef fused floating:
    float
    double
