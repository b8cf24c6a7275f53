"""Reading BPF ring buffers with libbpf (ring_buffer__new, __add, __poll), the library bcc
itself uses for this, through ctypes: without bcc, so a sensor whose programs were
compiled in a child (sensor/kernel/bccload.py) maps no LLVM.

Each record reaches its handler as bytes during poll() or block(). Both wait in the
kernel, so an idle ring costs no wakeups. poll() is for the main thread: a signal ends
its wait (EINTR), as it did through bcc. block() is for a thread of its own: it waits
for records or for wake() from another thread, so that thread needs no timeout to
notice that it should stop.
"""

from __future__ import annotations

import ctypes
import os
import select
from collections.abc import Callable

from sensor.errors import KernelError

# int (*ring_buffer_sample_fn)(void *ctx, void *data, size_t size)
_SAMPLE_FN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)
_lib: ctypes.CDLL | None = None


def _libbpf() -> ctypes.CDLL:
    global _lib  # noqa: PLW0603 - one handle on a shared library, set once
    if _lib is None:
        try:
            lib = ctypes.CDLL("libbpf.so.1", use_errno=True)
        except OSError:
            raise KernelError("libbpf.so.1 not found: install libbpf1 (bcc's python3-bpfcc "
                              "depends on it; make install)") from None
        lib.ring_buffer__new.restype = ctypes.c_void_p
        lib.ring_buffer__new.argtypes = [ctypes.c_int, _SAMPLE_FN, ctypes.c_void_p,
                                         ctypes.c_void_p]
        lib.ring_buffer__add.restype = ctypes.c_int
        lib.ring_buffer__add.argtypes = [ctypes.c_void_p, ctypes.c_int, _SAMPLE_FN,
                                         ctypes.c_void_p]
        lib.ring_buffer__poll.restype = ctypes.c_int
        lib.ring_buffer__poll.argtypes = [ctypes.c_void_p, ctypes.c_int]
        lib.ring_buffer__consume.restype = ctypes.c_int
        lib.ring_buffer__consume.argtypes = [ctypes.c_void_p]
        lib.ring_buffer__epoll_fd.restype = ctypes.c_int
        lib.ring_buffer__epoll_fd.argtypes = [ctypes.c_void_p]
        lib.ring_buffer__free.restype = None
        lib.ring_buffer__free.argtypes = [ctypes.c_void_p]
        _lib = lib
    return _lib


class RingBuffer:
    """One libbpf ring_buffer over any number of ring buffer maps."""

    def __init__(self) -> None:
        self._rb: int | None = None
        self._callbacks: list = []   # the C function pointers must outlive the ring
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._poller = select.poll()
        self._poller.register(self._wake_fd, select.POLLIN)

    def add(self, map_fd: int, handler: Callable[[bytes], None]) -> None:
        lib = _libbpf()

        def sample(_ctx, data, size) -> int:
            handler(ctypes.string_at(data, size))
            return 0

        callback = _SAMPLE_FN(sample)
        if self._rb is None:
            rb = lib.ring_buffer__new(map_fd, callback, None, None)
            if not rb:
                err = ctypes.get_errno()
                raise KernelError(f"cannot open the BPF ring buffer: {os.strerror(err)}")
            self._rb = rb
            # libbpf's epoll set over the rings: readable when any ring has records.
            self._poller.register(lib.ring_buffer__epoll_fd(rb), select.POLLIN)
        elif lib.ring_buffer__add(self._rb, map_fd, callback, None) < 0:
            err = ctypes.get_errno()
            raise KernelError(f"cannot add a BPF ring buffer: {os.strerror(err)}")
        self._callbacks.append(callback)

    def poll(self, timeout_ms: int) -> None:
        """Delivers what is there, waiting up to timeout_ms (-1: forever) for the first
        record. Returns early on a signal."""
        if self._rb is not None:
            _libbpf().ring_buffer__poll(self._rb, timeout_ms)

    def block(self, timeout_ms: int = -1) -> None:
        """Delivers what is there, waiting up to timeout_ms (-1: forever) for the first
        record or for wake(). A signal does not end the wait (Python retries it)."""
        if self._rb is None:
            return
        for fd, _ in self._poller.poll(timeout_ms):
            if fd == self._wake_fd:
                os.eventfd_read(self._wake_fd)
        _libbpf().ring_buffer__consume(self._rb)

    def wake(self) -> None:
        """Ends a block() in another thread now, or the next one at once."""
        os.eventfd_write(self._wake_fd, 1)

    def close(self) -> None:
        if self._rb is not None:
            _libbpf().ring_buffer__free(self._rb)
            self._rb = None
        self._callbacks = []
        if self._wake_fd >= 0:
            os.close(self._wake_fd)
            self._wake_fd = -1
