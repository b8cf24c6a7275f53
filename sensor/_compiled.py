"""The compiled per-packet path: which modules are compiled, and the choice at import time.

The modules in COMPILED are plain Python, compiled by Cython in its pure-Python mode
when the project is installed (setup.py; `make install` runs it): the .py stays the
source, static types come from `cython` decorators that do nothing uncompiled, and the
compiled module (`meter.cpython-3xx-....so`) sits beside its .py. Python would import
the .so whenever it exists, so an import hook (installed by `sensor/__init__.py`)
decides for each of these modules:

- LOUPE_PURE=1 in the environment, or a build made with LOUPE_PURE=1: the .py, silently;
- a compiled module built from this very source (its SHA-256 is in the build's
  manifest, `sensor/_compiled.json`, with its .pxd if it has one): the compiled module;
- otherwise the .py, and one log line for the whole process: the compiled module is
  missing (the build failed or never ran) or fails to load (a warning), or is older than
  its .py (an edit since the build: running the stale code would silently undo it; said
  at INFO, as the .py is then the code meant to run).

Compiled and pure modules give byte-identical records (tests/replay/test_compiled.py), so
the choice changes speed, never output.
"""

from __future__ import annotations

import hashlib
import importlib.abc
import importlib.machinery
import importlib.util
import json
import logging
import os
import sys

# Hottest first (bench_replay --breakdown). setup.py reads this tuple as text (it must not
# import the package), so it stays a literal.
COMPILED = (
    "sensor.engine.meter",
    "sensor.engine.flowtable",
    "sensor.engine.reassembly",
    "sensor.engine.l7engine",
    "sensor.flow.community_id",
    "sensor.flow.flowkey",
    "sensor.flow.semantics",
    "sensor.replay.reader",
    "sensor.l7.http1",
    "sensor.l7.dns",
    "sensor.l7.tls",
)

MANIFEST = "_compiled.json"
_HERE = os.path.dirname(os.path.abspath(__file__))
_log = logging.getLogger("loupe.compiled")

# name -> "compiled" or "pure: <reason>"; filled as the modules are imported.
_status: dict[str, str] = {}
_manifest: dict | None = None
_reported: set[int] = set()   # levels already logged: one line each at most


def source_sha256(path: str) -> str:
    """SHA-256 of a module's .py and, when it has one, its .pxd (setup.py's twin)."""
    digest = hashlib.sha256()
    for part in (path, path[:-3] + ".pxd"):
        try:
            with open(part, "rb") as f:
                digest.update(f.read())
        except FileNotFoundError:
            if part == path:
                raise
    return digest.hexdigest()


def status() -> dict[str, str]:
    """How each compiled-path module imported so far runs (for tests and diagnostics)."""
    return dict(_status)


def _source_path(name: str) -> str:
    return os.path.join(_HERE, *name.split(".")[1:]) + ".py"


def _load_manifest() -> dict:
    global _manifest
    if _manifest is None:
        try:
            with open(os.path.join(_HERE, MANIFEST), encoding="utf-8") as f:
                _manifest = json.load(f)
        except (OSError, ValueError):
            _manifest = {}
    return _manifest


def _pure(name: str, reason: str, *, quiet: bool = False, level: int = logging.WARNING) -> None:
    _status[name] = f"pure: {reason}"
    if quiet or level in _reported:
        return
    _reported.add(level)
    _log.log(level, "the compiled per-packet path is not used (%s: %s); running the pure-Python "
                 "modules, same records, slower (rebuild: make install, or "
                 ".venv/bin/pip install -e . --config-settings editable_mode=compat)",
                 name.rsplit(".", 1)[-1], reason)


class _Fallback(importlib.abc.Loader):
    """Loads the compiled module, or its .py when the shared object fails to load."""

    def __init__(self, ext: importlib.machinery.ExtensionFileLoader, name: str,
                 source: str) -> None:
        self.ext = ext
        self.name = name
        self.source = source
        self.pure: importlib.machinery.SourceFileLoader | None = None

    def create_module(self, spec):
        try:
            module = self.ext.create_module(spec)
        except (ImportError, OSError) as exc:   # not loadable: other ABI, missing symbol
            _pure(self.name, f"failed to load: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
            self.pure = importlib.machinery.SourceFileLoader(self.name, self.source)
            spec.origin = self.source
            spec.cached = importlib.util.cache_from_source(self.source)
            return None
        _status[self.name] = "compiled"
        return module

    def exec_module(self, module) -> None:
        if self.pure is not None:
            self.pure.exec_module(module)
            return
        try:
            self.ext.exec_module(module)
        except Exception as exc:  # noqa: BLE001 - any failure of its init: run the .py
            # A compiled module checks at init the compiled types it cimports: beside a
            # pure flowtable (its .py edited since the build), l7engine's init raises
            # "FlowTable size changed". The import system takes the module from
            # sys.modules after this call, so the pure one put there replaces it.
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            _pure(self.name, f"failed to load: {first}")
            spec = importlib.util.spec_from_file_location(self.name, self.source)
            pure = importlib.util.module_from_spec(spec)
            sys.modules[self.name] = pure
            try:
                spec.loader.exec_module(pure)
            except BaseException:
                sys.modules.pop(self.name, None)
                raise


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name not in COMPILED:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None:
            return None
        source = _source_path(name)
        if not os.path.exists(source):
            return spec          # an install without sources: nothing to fall back to
        manifest = _load_manifest()
        if os.environ.get("LOUPE_PURE", "") not in ("", "0"):
            reason, quiet = "LOUPE_PURE is set", True
        elif manifest.get("pure"):
            reason, quiet = "built with LOUPE_PURE", True
        elif not isinstance(spec.loader, importlib.machinery.ExtensionFileLoader):
            reason, quiet = "no compiled module (the build did not run or failed)", False
        elif manifest.get("modules", {}).get(name) != source_sha256(source):
            # An edit since the build (development): the .py is the code meant to run,
            # so this is said at INFO (-v), not as a warning on every run of every tool.
            _pure(name, "its .py or .pxd changed since the build", level=logging.INFO)
            return importlib.util.spec_from_file_location(name, source)
        else:
            spec.loader = _Fallback(spec.loader, name, source)
            return spec
        _pure(name, reason, quiet=quiet)
        return importlib.util.spec_from_file_location(name, source)


def install() -> None:
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
