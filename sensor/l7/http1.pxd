# Static types for the compiled build of http1.py (Cython, pure-Python mode: the .py is
# the source; uncompiled, this file is not read). The head parser's per-line scan works on
# C integers; Http1Parser is an extension type whose framing methods (_run and what it
# calls per segment) are C calls with C positions. Its attributes are declared for fixed
# offsets; it keeps an instance __dict__ so that an attribute added to the .py later
# works compiled too (slower) instead of breaking the build. _Txn stays a Python class.
cimport cython

@cython.locals(first=cython.int, colon=cython.Py_ssize_t, started=cython.bint)
cpdef tuple _parse_head(block)

cdef class Http1Parser:
    cdef dict __dict__
    cdef public object state, error, redact, _buf, _scan, _mode, _remaining, _head_ts
    cdef public object _eof, _txns, _awaiting, _req, _resp, _out, _host, _auth
    cdef public object _principal, inspect, pii, on_request, max_header_bytes
    cdef public object max_outstanding, transactions, _responses

    @cython.locals(d=cython.Py_ssize_t, n=cython.Py_ssize_t, pos=cython.Py_ssize_t)
    cpdef receive_data(self, direction, data, ts_ns)

    @cython.locals(d=cython.Py_ssize_t)
    cpdef skip_hint(self, direction)

    cpdef next_event(self)

    @cython.locals(pos=cython.Py_ssize_t, end=cython.Py_ssize_t, avail=cython.Py_ssize_t,
                   skipped=cython.Py_ssize_t, head_end=cython.Py_ssize_t,
                   next_pos=cython.Py_ssize_t, nl=cython.Py_ssize_t, semi=cython.Py_ssize_t)
    cdef _run(self, Py_ssize_t d, view, ts_ns)

    @cython.locals(scan=cython.Py_ssize_t, start=cython.Py_ssize_t, crlf=cython.Py_ssize_t,
                   lf=cython.Py_ssize_t)
    cdef tuple _find_head_end(self, Py_ssize_t d, view, Py_ssize_t pos)

    cdef _check_start(self, Py_ssize_t d, view, Py_ssize_t pos)
    cdef _capture(self, view, Py_ssize_t pos, n)
    cdef _capture_response(self, view, Py_ssize_t pos, n)
    cdef _body(self, Py_ssize_t d, n)
    cdef _lost(self, Py_ssize_t d, length, what)
    cdef _complete(self, Py_ssize_t d)
    cdef _emit_ready(self)
    cdef _flush_all(self)
