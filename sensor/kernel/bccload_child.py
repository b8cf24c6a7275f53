"""The child half of sensor/kernel/bccload.py: compile one BPF C file with bcc, load its
programs (bcc also attaches tracepoint__* functions itself), hand every program, map
and attachment descriptor to the parent over a unix socket (SCM_RIGHTS), and exit.

Run as `python -I bccload_child.py SOCKET_FD REQUEST_JSON`: isolated (no cwd, script
directory or PYTHON* variables on the path, for a child that runs as root), so it
imports nothing of Loupe, only the standard library and bcc.

It leaves with os._exit, never through bcc's atexit cleanup: that would disable the perf
events behind the tracepoint attachments (PERF_EVENT_IOC_DISABLE acts on the open file
the parent now shares, so the tracepoint would stop firing there too) and close the
maps before the parent has read its copies of them.
"""

import ctypes
import json
import os
import signal
import socket
import sys
import traceback


_PR_SET_PDEATHSIG = 1


def _reply(sock: socket.socket, message: dict, fds: list[int] = ()) -> None:
    socket.send_fds(sock, [json.dumps(message).encode()], list(fds))


def _maps(lib, module) -> list[tuple[str, int, int, int]]:
    """(name, fd, key size, value size) of every map bcc created for the module."""
    lib.bpf_num_tables.restype = ctypes.c_size_t
    lib.bpf_num_tables.argtypes = [ctypes.c_void_p]
    lib.bpf_table_name.restype = ctypes.c_char_p
    lib.bpf_table_name.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    for fn in (lib.bpf_table_fd_id, lib.bpf_table_key_size_id, lib.bpf_table_leaf_size_id):
        fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    lib.bpf_table_fd_id.restype = ctypes.c_int
    lib.bpf_table_key_size_id.restype = ctypes.c_size_t
    lib.bpf_table_leaf_size_id.restype = ctypes.c_size_t
    out = []
    for i in range(lib.bpf_num_tables(module)):
        out.append((lib.bpf_table_name(module, i).decode(), lib.bpf_table_fd_id(module, i),
                    lib.bpf_table_key_size_id(module, i), lib.bpf_table_leaf_size_id(module, i)))
    return out


def compile_and_load(sock: socket.socket, request: dict) -> None:
    try:
        from bcc import BPF, lib
    except ImportError as exc:
        _reply(sock, {"stage": "import", "error": str(exc)})
        return
    try:
        bpf = BPF(src_file=request["src"].encode(), cflags=request["cflags"])
    except Exception as exc:  # bcc raises bare Exception for compile, load and attach
        _reply(sock, {"stage": "compile", "error": str(exc)})
        return
    attach_types = {}
    for name, prog_type, *attach_type in request["programs"]:
        if attach_type:
            # An expected attach type the kernel may not know (uprobe_multi before 6.6):
            # without it, the program is loaded as before and the parent is told so.
            try:
                bpf.load_func(name.encode(), prog_type, attach_type=attach_type[0])
                attach_types[name] = attach_type[0]
                continue
            except Exception:  # bcc raises bare Exception
                pass
        try:
            bpf.load_func(name.encode(), prog_type)
        except Exception as exc:  # the verifier's refusal, as a bare Exception
            _reply(sock, {"stage": "load", "program": name, "error": str(exc)})
            return
    fds: list[int] = []

    def index(fd: int) -> int:
        fds.append(fd)
        return len(fds) - 1

    reply = {
        "programs": {fn.name.decode(): index(fn.fd) for fn in bpf.funcs.values()},
        "maps": {name: [index(fd), key, value] for name, fd, key, value in _maps(lib, bpf.module)},
        "links": [index(fd) for fd in [*bpf.tracepoint_fds.values(),
                                       *bpf.raw_tracepoint_fds.values()]],
        "attach_types": attach_types,
    }
    _reply(sock, reply, fds)


def _follow_parent() -> None:
    """Signals are the parent's to handle: Ctrl-C at a terminal or systemd's stop reach
    this whole process group, and the parent finishes its start-up (this compile) before
    it stops, as it did when it compiled itself. If the parent dies, so does this child
    (PR_SET_PDEATHSIG), instead of compiling for nobody."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() == 1:
        os._exit(1)   # the parent was gone before the line above


def main() -> None:
    _follow_parent()
    sock = socket.socket(fileno=int(sys.argv[1]))
    code = 0
    try:
        compile_and_load(sock, json.loads(sys.argv[2]))
    except BaseException as exc:  # a bug here: say so, then still leave by os._exit
        traceback.print_exc()
        code = 1
        try:
            _reply(sock, {"stage": "internal", "error": f"{type(exc).__name__}: {exc}"})
        except OSError:
            pass   # the parent is gone
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
