"""`loupe config check FILE` and `loupe config show`: validate a configuration before a
restart picks it up, and print the configuration a daemon would run with.

Exit status of `check`: 0 valid, 2 invalid (ConfigError.exit_code), with every bad key
and its reason on stderr, one line each, so `loupe config check /etc/loupe/sensor.toml &&
systemctl reload loupe-sensor` never reloads a broken file.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sensor import config


def _kind_for(path: Path, explicit: str | None) -> str:
    # The two files are told apart by name, as installed (sensor.toml, collector.toml);
    # --kind decides for files named otherwise.
    if explicit:
        return explicit
    return "collector" if "collector" in path.name else "sensor"


def _check(args: argparse.Namespace) -> int:
    kind = _kind_for(args.file, args.kind)
    try:
        config.load_config(kind, args.file)
    except config.ConfigProblems as exc:
        # Every bad key of the file at once, one line each, so one edit fixes them all.
        for problem in exc.problems:
            print(f"loupe: error: {problem}", file=sys.stderr)
        return exc.exit_code
    print(f"{args.file}: ok ({kind} configuration)")
    return 0


def _show(args: argparse.Namespace) -> int:
    kind = args.kind or ("collector" if args.file and "collector" in args.file.name else "sensor")
    overrides = config.parse_set_arguments(args.config_set)
    effective = config.load_config(kind, args.file, overrides=overrides)
    sys.stdout.write(config.config_to_toml(effective, hide_secrets=not args.show_secrets))
    return 0


def register(tree) -> None:
    check = tree.command(
        "config check", help="validate a sensor.toml or collector.toml",
        description="Validate a configuration file. Exit status 0 when valid, 2 when not, "
                    "with every bad key and why, one line each.")
    check.add_argument("file", type=Path, metavar="FILE")
    check.add_argument("--kind", choices=sorted(config.CONFIG_KINDS),
                       help="which schema (default: collector if the name says so, else sensor)")
    check.set_defaults(func=_check)

    show = tree.command(
        "config show", help="print the effective configuration (file + defaults + --set)",
        description="Print the configuration a daemon would run with, every key included, "
                    "as TOML that `loupe config check` accepts.")
    show.add_argument("file", type=Path, nargs="?", default=None, metavar="FILE",
                      help="configuration file (default /etc/loupe/<kind>.toml)")
    show.add_argument("--kind", choices=sorted(config.CONFIG_KINDS),
                      help="which schema (default: sensor, or collector if FILE says so)")
    show.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      dest="config_set", help="override one key, as the daemons' --set does")
    show.add_argument("--show-secrets", action="store_true",
                      help="print passwords as they are (hidden by default)")
    show.set_defaults(func=_show)
