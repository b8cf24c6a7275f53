"""The L7 parser fuzz command: N executions per parser, nothing may escape.

    .venv/bin/python -m tests.fuzz PARSER|all --execs N [--engine atheris|mutate]

Each execution is one fuzz script (tests/l7/harness.py, decode()) run on a fresh parser:
data, datagrams, gaps, skips and ends of stream in both directions. The seeds are the
parser's golden captures, encoded as scripts.

Engines. atheris (the default when it is installed) is libFuzzer driving Python with
coverage feedback from the instrumented sensor modules: it keeps inputs that reach new
branches and mutates those. It runs in a child process per parser because libFuzzer exits
the process when it is done. `mutate` is a plain loop of byte-level mutations of the seeds
(harness.mutate) with no feedback, about 5x faster per execution; it needs nothing beyond
the standard library, and with --keep-going it reports every distinct crash.

A crash prints the exception and leaves the input under --out; the exit status is then 1.
The suite runs the short hypothesis version (tests/l7/test_harness.py).
"""

from __future__ import annotations

import argparse
import random
import re
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

PARSER_NAMES = ("http1", "dns", "tls", "mysql", "pgsql", "redis", "http2", "quic", "kafka",
                "mongodb", "smtp", "imap", "pop3", "ftp")

# Scripts longer than this are cut: enough for the seeds' opening exchanges (logins,
# handshakes, the first queries), short enough to keep executions fast. libFuzzer's own
# default follows the largest seed (200 KB of one Redis value).
MAX_LEN = 8192

_DONE = re.compile(r"Done (\d+) runs in (\d+) second")


def _atheris_child(name: str, execs: int, out: Path, max_len: int) -> None:
    import atheris

    with atheris.instrument_imports(include=["sensor"]):
        from tests.l7 import harness
    factory = harness.PARSERS[name][0]
    # Kept between runs: libFuzzer adds the inputs that reached new code, and a later run
    # starts from them.
    corpus = out / f"corpus-{name}"
    corpus.mkdir(exist_ok=True)
    for i, seed in enumerate(harness.seeds(name)):
        (corpus / f"seed{i}").write_bytes(seed)

    def one(data: bytes) -> None:
        harness.drive(factory, data)

    atheris.Setup([sys.argv[0], f"-runs={execs}", f"-max_len={max_len}",
                   f"-artifact_prefix={out}/{name}-", "-print_final_stats=1", str(corpus)],
                  one)
    atheris.Fuzz()


def _atheris(name: str, execs: int, out: Path, max_len: int) -> bool:
    """Run the child, its libFuzzer log into out/NAME.log; print the figures."""
    log = out / f"{name}.log"
    with log.open("w") as fh:
        rc = subprocess.run([sys.executable, "-m", "tests.fuzz", name, "--execs", str(execs),
                             "--max-len", str(max_len), "--out", str(out), "--child"],
                            stdout=fh, stderr=subprocess.STDOUT, check=False).returncode
    text = log.read_text(errors="replace")
    done = _DONE.search(text)
    if rc == 0 and done:
        runs, secs = int(done.group(1)), max(int(done.group(2)), 1)
        print(f"{name}: {runs} executions in {secs} s ({runs // secs} exec/s), "
              f"nothing escaped [atheris, log {log}]")
        return True
    tail = "\n".join(text.splitlines()[-40:])
    print(f"{name}: CRASH (exit {rc}); input and log under {out}\n{tail}")
    return False


def _mutate(name: str, execs: int, out: Path, max_len: int, seed: int,
            keep_going: bool) -> bool:
    from tests.l7 import harness

    factory = harness.PARSERS[name][0]
    seeds = harness.seeds(name)
    rng = random.Random(seed)
    # Distinct crashes (exception type and the line it came from) -> first input.
    crashes: dict[tuple[str, str, int], Path] = {}
    start = time.perf_counter()
    for i in range(execs):
        # Mostly mutated captures (they reach deep states); some pure noise.
        if i % 10:
            script = harness.mutate(rng, rng.choice(seeds)[:max_len], max_len)
        else:
            script = rng.randbytes(rng.randrange(max_len))
        try:
            harness.drive(factory, script)
        except Exception as exc:  # noqa: BLE001 - whatever escapes is the finding
            where = traceback.extract_tb(exc.__traceback__)[-1]
            key = (type(exc).__name__, where.filename, where.lineno or 0)
            if key not in crashes:
                path = crashes[key] = out / f"{name}-crash-{i}"
                path.write_bytes(script)
                print(f"{name}: CRASH at execution {i}; input in {path}")
                traceback.print_exc()
            if not keep_going:
                return False
    secs = time.perf_counter() - start
    verdict = f"{len(crashes)} distinct crashes" if crashes else "nothing escaped"
    print(f"{name}: {execs} executions in {secs:.0f} s ({execs / secs:.0f} exec/s), "
          f"{verdict} [mutate, seed {seed}]")
    return not crashes


def _has_atheris() -> bool:
    try:
        import atheris  # noqa: F401
    except ImportError:
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.fuzz", description=__doc__.split("\n")[0])
    ap.add_argument("parser", choices=(*PARSER_NAMES, "all"))
    ap.add_argument("--execs", type=int, default=1_000_000)
    ap.add_argument("--engine", choices=("atheris", "mutate"),
                    default="atheris" if _has_atheris() else "mutate")
    ap.add_argument("--max-len", type=int, default=MAX_LEN)
    ap.add_argument("--seed", type=int, default=0, help="mutate engine's random seed")
    ap.add_argument("--keep-going", action="store_true",
                    help="mutate engine: go on after a crash, report each distinct one")
    ap.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "loupe-fuzz")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.child:
        _atheris_child(args.parser, args.execs, args.out, args.max_len)
        return 0
    if args.engine == "atheris" and not _has_atheris():
        print("atheris is not installed: pip install atheris, or use --engine mutate")
        return 2
    names = PARSER_NAMES if args.parser == "all" else (args.parser,)
    ok = True
    # One parser after another: each engine run takes a core.
    for name in names:
        if args.engine == "atheris":
            ok &= _atheris(name, args.execs, args.out, args.max_len)
        else:
            ok &= _mutate(name, args.execs, args.out, args.max_len, args.seed,
                          args.keep_going)
        sys.stdout.flush()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
