# Static types for the compiled build of dns.py (Cython, pure-Python mode: the .py is the
# source; uncompiled, this file is not read). The name walk and the 16-bit reads run for
# every name of every message: their offsets, lengths and counters are C integers. Names
# and offsets stay within a 64 KiB message, far below Py_ssize_t.
cimport cython

@cython.locals(end=cython.Py_ssize_t, run_start=cython.Py_ssize_t, jumps=cython.int,
               wire=cython.Py_ssize_t, size=cython.Py_ssize_t, n=cython.int,
               target=cython.Py_ssize_t)
cpdef tuple read_name(msg, Py_ssize_t pos)

cpdef long _u16(msg, Py_ssize_t pos) except? -1

@cython.locals(total=cython.Py_ssize_t, n=cython.int)
cpdef Py_ssize_t _name_end(msg, Py_ssize_t pos) except? -2
