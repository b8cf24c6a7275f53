# Static types for the compiled build of reader.py (Cython, pure-Python mode; see
# sensor/engine/flowtable.pxd). _iter_pcap's locals are typed in reader.py itself
# (a generator cannot be declared here); _le32 is a C pointer read.
cdef inline unsigned long long _le32(const unsigned char *p, Py_ssize_t off)
