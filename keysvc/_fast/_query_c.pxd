# Declarations for compiling _query_py.py (through the _query_c.py link) in Cython's pure-Python mode.
import cython

cdef object _PERMISSION_CHARS
cdef int _MAX_DEPTH

@cython.locals(i=Py_ssize_t, j=Py_ssize_t, n=Py_ssize_t)
cdef list _tokenize(str query)

cdef class _Parser:
    cdef list tokens
    cdef Py_ssize_t pos
    cdef str peek(self)
    cdef object expr(self, int depth)
    cdef object conjunction(self, int depth)
    cdef object primary(self, int depth)

cpdef object parse_permission_query(str query)
cpdef bint permission_query_holds(object node, object permissions)
