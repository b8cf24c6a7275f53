# Static types for the compiled build of flowkey.py (Cython, pure-Python mode; see
# sensor/engine/flowtable.pxd). _uid_text turns a digest into a uid with C arithmetic.
cimport cython

@cython.locals(d="const unsigned char *", alpha="const char *", l0=cython.ulonglong,
               l1=cython.ulonglong, l2=cython.ulonglong, l3=cython.ulonglong,
               r=cython.ulonglong, x=cython.ulonglong, i=cython.int, out="char[18]")
cpdef str _uid_text(digest)
