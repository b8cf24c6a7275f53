# Static types for the compiled build of meter.py (see flowtable.pxd). Meter.feed is the
# per-packet path: its header fields are C integers, its flow a FlowState.
cimport cython
from sensor.engine.flowtable cimport FlowState, FlowTable

cdef class Meter:
    cdef public object sink, _stats, _frags, _defrag
    cdef public long long _packets, _metered
    cdef public FlowTable table

    @cython.locals(st=FlowState, table=FlowTable, n=cython.longlong, vlan=cython.longlong,
                   ivlan=cython.longlong, et=cython.longlong, vihl=cython.longlong,
                   ip_len=cython.longlong, ip_id=cython.longlong, frag=cython.longlong,
                   proto=cython.longlong, l4=cython.longlong, end=cython.longlong,
                   cap_end=cython.longlong, doff=cython.longlong, tcp_flags=cython.longlong,
                   d=cython.longlong, pstart=cython.longlong, plen=cython.longlong,
                   seq=cython.longlong, ack=cython.longlong, off=cython.longlong,
                   ver=cython.longlong, ihl=cython.longlong, hops=cython.longlong,
                   nxt=cython.longlong, fo=cython.longlong, bit=cython.longlong,
                   seen=cython.longlong, shift=cython.longlong, syn=cython.longlong,
                   fin=cython.longlong, rst=cython.longlong, nbits=cython.longlong,
                   top=cython.longlong, delta=cython.longlong, frag_off=cython.longlong,
                   frag_more=cython.longlong, first_frag=cython.bint,
                   later_frag=cython.bint, general=cython.bint, sport=cython.longlong,
                   dport=cython.longlong, i=cython.longlong, link=cython.longlong,
                   p="const unsigned char *", u=cython.ulonglong, last=cython.longlong)
    cpdef feed(self, ts, ifindex, link, frame, wire_len)
    cpdef feed_from(self, packets)
