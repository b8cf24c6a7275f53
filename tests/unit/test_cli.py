"""The command tree: each module registers exactly the top-level words COMMAND_MODULES
says it does (so `loupe WORD` can import only its owners), and every command has help."""

import argparse
import subprocess
import sys

from sensor import cli


def _top_words(parser: argparse.ArgumentParser) -> set[str]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return set(action.choices)
    return set()


def test_each_module_registers_the_words_it_declares():
    for module, words in cli.COMMAND_MODULES.items():
        assert _top_words(cli.build_parser([module])) == set(words), module


def test_modules_for_picks_owners_and_falls_back_to_all():
    assert cli.modules_for(["replay", "x.pcap"]) == ["sensor.replay.cli"]
    assert cli.modules_for(["-v", "sensor", "run"]) == ["sensor.kernel.cli", "sensor.sensor_cli"]
    assert cli.modules_for(["--help"]) == list(cli.COMMAND_MODULES)
    assert cli.modules_for(["nonsense"]) == list(cli.COMMAND_MODULES)


def test_unknown_command_is_one_line_and_exit_2():
    out = subprocess.run([sys.executable, "-m", "sensor.cli", "nonsense"],
                         capture_output=True, text=True)
    assert out.returncode == 2
    assert "invalid choice: 'nonsense'" in out.stderr
    assert "Traceback" not in out.stderr


def test_replay_imports_no_grpc_or_numpy():
    code = ("import sys; from sensor import cli; cli.build_parser(cli.modules_for(['replay'])); "
            "print(sorted(m for m in ('numpy', 'prometheus_client', 'collector.cli') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def _help(*words: str) -> str:
    out = subprocess.run([sys.executable, "-m", "sensor.cli", *words, "--help"],
                         capture_output=True, text=True, check=True)
    return out.stdout


def test_one_flag_vocabulary_with_old_spellings_hidden():
    """-o FILE and --format everywhere records are written; --collector and --sensor-id;
    the old spellings parse but are not shown."""
    helps = {words: _help(*words) for words in (("tail",), ("query",), ("replay",),
                                                ("sensor", "flows"), ("sensor", "run"))}
    for words, text in helps.items():
        assert "-o FILE, --output FILE" in text and "--format FMT" in text, words
    assert "--collector HOST:PORT" in helps[("replay",)] and "--to " not in helps[("replay",)]
    assert "--sensor-id V" in helps[("tail",)] and "--sensor V" not in helps[("tail",)]
    assert "--jsonl" not in helps[("sensor", "run")]
    parser = cli.build_parser()
    old = cli.parse(parser, ["replay", "x.pcap", "--to", "h:1"])
    new = cli.parse(parser, ["replay", "x.pcap", "--collector", "h:1"])
    assert old.to == new.to == "h:1"
    old = cli.parse(parser, ["tail", "--sensor", "s1", "--not-sensor", "s2"])
    assert (old.sensor_id, old.not_sensor_id) == (["s1"], ["s2"])


def test_misspelt_flag_prints_the_subcommands_usage():
    out = subprocess.run([sys.executable, "-m", "sensor.cli", "replay", "x.pcap", "--bogus"],
                         capture_output=True, text=True)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.startswith("usage: loupe replay ")
    assert out.stderr.splitlines()[-1] == "loupe replay: error: unrecognized arguments: --bogus"


def test_version_comes_from_the_package():
    from importlib import metadata

    out = subprocess.run([sys.executable, "-m", "sensor.cli", "--version"],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == f"loupe {metadata.version('loupe')}"


def test_sensor_run_output_flags_and_their_old_spellings():
    import pytest

    from sensor.errors import ConfigError
    from sensor.sensor_cli import output_flags

    parser = cli.build_parser(["sensor.kernel.cli", "sensor.sensor_cli"])

    def mapped(*argv):
        args = cli.parse(parser, ["sensor", "run", *argv])
        output_flags(args)
        return args.output, args.jsonl

    assert mapped() == ("none", None)
    assert mapped("-o", "-") == mapped("--output", "jsonl") == mapped("-o", "json") == ("jsonl", None)
    assert mapped("-o", "/tmp/r.jsonl") == mapped("--jsonl", "/tmp/r.jsonl") == ("none", "/tmp/r.jsonl")
    assert mapped("--output", "none") == ("none", None)
    with pytest.raises(ConfigError, match="live sensor writes json"):
        mapped("--format", "zeek")
