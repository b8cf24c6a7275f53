"""`loupe block add|list|del`: source bans in a running sensor's kernel maps.

The command opens the verdict maps the sensor pinned under its [enforce] pin_dir
(sensor/enforce/pins.py) and reads or writes them directly; the sensor needs no control
channel for it, and its own loop deletes expired entries. When no sensor runs (no pins,
or pins whose heartbeat is stale: a killed sensor, whose blocks the kernel already
ignores) the command says so and exits NOT_RUNNING (3).
"""

from __future__ import annotations

import ipaddress
import time

from sensor.errors import ConfigError

NOT_RUNNING = 3
DEFAULT_TTL = "10m"


def register(tree) -> None:
    from sensor.enforce.pins import DEFAULT_PIN_DIR  # noqa: PLC0415

    def common(p):
        p.add_argument("--pin-dir", default=DEFAULT_PIN_DIR, metavar="DIR",
                       help=f"the sensor's [enforce] pin_dir (default {DEFAULT_PIN_DIR})")

    p = tree.command("block add", help="drop every packet from an address or prefix for a TTL",
                     description="Ban a source address or prefix in the running sensor's "
                                 "kernel: its packets are\ndropped, new flows at their first "
                                 "packet, until the TTL ends.")
    p.add_argument("prefix", metavar="PREFIX", help="address or CIDR prefix, IPv4 or IPv6")
    p.add_argument("--ttl", default=DEFAULT_TTL, metavar="DURATION",
                   help=f"how long: 30s, 10m, 2h (default {DEFAULT_TTL}, at most 168h)")
    p.add_argument("--note", default="", help="a note shown by `loupe block list` (31 bytes)")
    common(p)
    p.set_defaults(func=add)
    p = tree.command("block list", help="active blocks: prefix or flow, reason, expiry")
    common(p)
    p.set_defaults(func=list_)
    p = tree.command("block del", help="lift the ban of a prefix")
    p.add_argument("prefix", metavar="PREFIX", help="the prefix exactly as listed")
    common(p)
    p.set_defaults(func=delete)


def _network(text: str):
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise ConfigError(f"{text!r} is not an IPv4 or IPv6 address or prefix") from None


def _ttl_ns(text: str) -> int:
    from sensor.enforce.maps import MAX_TTL_NS  # noqa: PLC0415
    from sensor.rules.loader import _duration_ns  # noqa: PLC0415

    ttl = _duration_ns(text)
    if ttl is None or not 10**9 <= ttl <= MAX_TTL_NS:
        raise ConfigError(f"--ttl {text!r}: a duration from 1s to 168h (7 days): 30s, 10m, 2h")
    return ttl


def _open(pin_dir: str):
    """The pinned maps of a live sensor; None (after saying why) when none runs."""
    from sensor.enforce import pins  # noqa: PLC0415
    from sensor.kernel import abi  # noqa: PLC0415

    try:
        maps = pins.open_pinned(pin_dir)
    except pins.NoSensor as exc:
        print(f"loupe block: {exc}")
        return None
    age = maps.heartbeat_age_ns()
    if not 0 <= age < abi.BLOCK_STALE_NS:
        pins.close(maps)
        print(f"loupe block: the sensor that pinned {pin_dir} is not running (its last "
              f"heartbeat is {age / 1e9:.0f} s old; blocks are not enforced): start "
              "`loupe sensor run`")
        return None
    return maps


def _expires(mono_ns: int) -> str:
    left = (mono_ns - time.monotonic_ns()) / 1e9
    at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + left))
    return f"{at} (in {left:.0f} s)"


def add(args) -> int:
    from sensor.enforce import pins  # noqa: PLC0415
    from sensor.enforce.maps import MapFull  # noqa: PLC0415
    from sensor.kernel import abi  # noqa: PLC0415

    net = _network(args.prefix)
    ttl = _ttl_ns(args.ttl)
    maps = _open(args.pin_dir)
    if maps is None:
        return NOT_RUNNING
    try:
        expires = maps.block_src(net, ttl, abi.BLOCK_CLI, args.note)
    except MapFull:
        print(f"loupe block: the sensor's block_src map is full ({abi.BLOCK_SRC_ENTRIES} "
              "entries): delete some, or wait for them to expire")
        return 1
    finally:
        pins.close(maps)
    print(f"blocked {net} until {_expires(expires)}")
    return 0


def list_(args) -> int:
    from sensor.enforce import pins  # noqa: PLC0415

    maps = _open(args.pin_dir)
    if maps is None:
        return NOT_RUNNING
    try:
        blocks = maps.entries()
    finally:
        pins.close(maps)
    if not blocks:
        print("no active blocks")
        return 0
    width = max(len(b.target) for b in blocks)
    print(f"{'BLOCKED':<{width}}  REASON  NOTE                             EXPIRES")
    for b in sorted(blocks, key=lambda b: (b.kind, b.expires_mono_ns)):
        print(f"{b.target:<{width}}  {b.reason:<6}  {b.note:<31}  {_expires(b.expires_mono_ns)}")
    return 0


def delete(args) -> int:
    from sensor.enforce import pins  # noqa: PLC0415

    net = _network(args.prefix)
    maps = _open(args.pin_dir)
    if maps is None:
        return NOT_RUNNING
    try:
        gone = maps.unblock_src(net)
    finally:
        pins.close(maps)
    if not gone:
        print(f"loupe block: {net} is not blocked (`loupe block list` shows what is)")
        return 1
    print(f"unblocked {net}")
    return 0
