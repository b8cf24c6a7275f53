"""`loupe`: the one console command. Subcommands live with the component they drive;
this module only builds the command tree and turns expected failures into one line.

Each module in COMMAND_MODULES has `register(tree: CommandTree)` and adds its commands
with `tree.command("sensor flows", help=...)`, which returns an argparse parser whose
`func` default is called with the parsed arguments and returns an exit status.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from sensor.errors import LoupeError
from sensor.logs import setup_logging

# module -> the top-level command words it registers. `loupe replay ...` imports only
# the module(s) owning `replay`: every command module pulls in heavy libraries (grpc,
# numpy, prometheus) and a full import costs a third of a second per run. `loupe --help`
# and unknown words import them all. tests/unit/test_cli.py checks this table.
COMMAND_MODULES: dict[str, tuple[str, ...]] = {
    "collector.cli": ("collector", "export", "certs", "tail", "query", "top"),
    "collector.inventory.cli": ("endpoints", "api"),
    "collector.inventory.pii_cli": ("pii",),
    "collector.clients.cli": ("clients",),
    "collector.stats.cli": ("services",),
    "sensor.config_cli": ("config",),
    "sensor.enforce.cli": ("block",),
    "sensor.kernel.cli": ("sensor",),
    "sensor.replay.cli": ("replay",),
    "sensor.rules.cli": ("rules",),
    "sensor.sensor_cli": ("sensor",),
    "sensor.status_cli": ("status",),
}

# Help lines for command groups (their subcommands bring their own).
GROUP_HELP = {
    "collector": "run the collector, or ask a running one for its status",
    "certs": "make a CA and TLS certificates for collector, sensors and analysts",
    "config": "check and show configuration files",
    "api": "OpenAPI from the endpoint inventory, and a diff against a given spec",
    "sensor": "meter live interfaces in the kernel and run the sensor",
    "rules": "check rule files, and test them on a capture",
    "block": "ban sources in the running sensor's kernel; list and lift blocks",
}


class CommandTree:
    """Nested argparse subcommands by space-separated path ("collector run")."""

    def __init__(self, parser: argparse.ArgumentParser) -> None:
        self._root = parser
        self._groups: dict[str, argparse._SubParsersAction] = {
            "": parser.add_subparsers(dest="command", metavar="COMMAND")
        }
        self._parsers: dict[str, argparse.ArgumentParser] = {"": parser}

    def _group(self, path: str) -> argparse._SubParsersAction:
        if path not in self._groups:
            parent, _, name = path.rpartition(" ")
            parser = self._parsers.get(path) or self.command(
                path, help=GROUP_HELP.get(path, f"{name} commands")
            )
            self._groups[path] = parser.add_subparsers(dest=f"{path}_command", metavar="COMMAND")
        return self._groups[path]

    def command(self, path: str, *, help: str, description: str | None = None):
        parent, _, name = path.rpartition(" ")
        parser = self._group(parent).add_parser(
            name, help=help, description=description or help,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        parser.set_defaults(func=None, _parser=parser)
        self._parsers[path] = parser
        return parser


def _first_word(argv: list[str]) -> str | None:
    for arg in argv:
        if not arg.startswith("-"):
            return arg
    return None


def modules_for(argv: list[str] | None) -> list[str]:
    """The command modules to import for this command line (all when unsure)."""
    word = _first_word(sys.argv[1:] if argv is None else argv)
    owners = [m for m, words in COMMAND_MODULES.items() if word in words]
    return owners or list(COMMAND_MODULES)


def version() -> str:
    """The installed package's version; a source tree without an install reads
    pyproject.toml."""
    from importlib import metadata

    try:
        return metadata.version("loupe")
    except metadata.PackageNotFoundError:
        import tomllib
        from pathlib import Path

        pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
        try:
            return tomllib.loads(pyproject.read_text())["project"]["version"]
        except (OSError, KeyError, tomllib.TOMLDecodeError):
            return "unknown"


def build_parser(modules: list[str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loupe",
        description="Loupe: eBPF-assisted flow and L7 sensor, collector and analyst tools.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"loupe {version()}")
    parser.set_defaults(func=None, _parser=parser)
    tree = CommandTree(parser)
    for name in COMMAND_MODULES if modules is None else modules:
        importlib.import_module(name).register(tree)
    return parser


def parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """parse_args, except that a flag no parser knows is reported with the usage of the
    subcommand it was given to (`loupe tail --sinse 1h` shows tail's usage, not loupe's)."""
    args, extra = parser.parse_known_args(argv)
    if extra:
        args._parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: list[str] | None = None) -> int:
    parser = build_parser(modules_for(argv))
    args = parse(parser, argv)
    # One line per event on stderr, with syslog priority prefixes under journald.
    setup_logging(verbose=args.verbose)
    if args.func is None:
        args._parser.print_help(sys.stderr)
        return 2
    try:
        return int(args.func(args) or 0)
    except LoupeError as exc:
        print(f"loupe: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `loupe tail | head`: the reader left; not an error.
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
