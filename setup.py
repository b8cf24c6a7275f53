"""Build of the compiled per-packet path (everything else is in pyproject.toml).

`pip install` (which `make install` runs) compiles the modules listed in
sensor/_compiled.py with Cython, in its pure-Python mode: the .py files stay the source
and stay importable uncompiled. Each extension is optional: a module that fails to
compile leaves a warning in the build log and runs as Python (sensor/_compiled.py says so
in one line at run time). LOUPE_PURE=1 at install time builds nothing.

The build writes sensor/_compiled.json: the SHA-256 of each compiled module's source, so
that a .py edited after the build runs as Python instead of as its stale compiled self.
"""

import ast
import hashlib
import json
import os

from setuptools import setup
from setuptools.command.build_ext import build_ext

HERE = os.path.dirname(os.path.abspath(__file__))


def _compiled_modules() -> tuple:
    with open(os.path.join(HERE, "sensor", "_compiled.py"), encoding="utf-8") as f:
        tree = ast.parse(f.read())
    for node in tree.body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "COMPILED":
            return ast.literal_eval(node.value)
    raise SystemExit("sensor/_compiled.py: COMPILED not found")


def _source(name: str) -> str:
    return os.path.join(*name.split(".")) + ".py"


PURE = os.environ.get("LOUPE_PURE", "") not in ("", "0")
MODULES = () if PURE else _compiled_modules()


def _source_sha256(path: str) -> str:
    """SHA-256 of the .py and, when there is one, the .pxd (sensor/_compiled.py's twin)."""
    digest = hashlib.sha256()
    for part in (path, path[:-3] + ".pxd"):
        if part == path or os.path.exists(part):
            with open(part, "rb") as f:
                digest.update(f.read())
    return digest.hexdigest()


class BuildExt(build_ext):
    """build_ext that records which modules it compiled, from which source."""

    def finalize_options(self):
        super().finalize_options()
        if not self.parallel:
            self.parallel = os.cpu_count() or 1   # one C file per module: compile side by side

    def run(self):
        super().run()
        built = {}
        for ext in self.extensions:
            if os.path.exists(self.get_ext_fullpath(ext.name)):
                built[ext.name] = _source_sha256(os.path.join(HERE, _source(ext.name)))
        _write_manifest(os.path.dirname(self.get_ext_fullpath("sensor._x")), built)


def _write_manifest(directory: str, built: dict) -> None:
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "_compiled.json"), "w", encoding="utf-8") as f:
        json.dump({"pure": PURE, "modules": built}, f, indent=1, sort_keys=True)


ext_modules = []
if MODULES:
    from Cython.Build import cythonize
    from setuptools import Extension

    ext_modules = cythonize(
        [Extension(name, [_source(name)], optional=True) for name in MODULES],
        compiler_directives={
            "language_level": 3,
            # Annotations are documentation here (`frame: bytes` also receives
            # memoryviews): types come only from explicit cython.* declarations.
            "annotation_typing": False,
            # Python semantics where they could differ: integer division, negative
            # indices, bounds and None checks stay as the .py behaves.
            "cdivision": False,
            "wraparound": True,
            "boundscheck": True,
        },
        quiet=True,
    )
elif PURE:
    _write_manifest(os.path.join(HERE, "sensor"), {})

setup(ext_modules=ext_modules, cmdclass={"build_ext": BuildExt})
