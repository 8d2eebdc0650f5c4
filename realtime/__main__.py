"""`python -m realtime --model BUNDLE [...]`: the jam runner without the pipeline (no params.yaml).

The same `run_jam` and the same flags as `jam play`: one per `JamSettings` field (`--silence-gap-s 0.5`,
`--no-follow-clock`, `-a style_a=2 -a style_b=1` or `-a none`); `--input-file` implies `--transport file`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from realtime.settings import Flag, JamSettings, flags, parse_adapters


def _add(ap: argparse.ArgumentParser, flag: Flag) -> None:
    """One argparse option for `flag`; every default is None (= the field's default) so given values stand out."""
    help_ = f"{flag.help} (default: {flag.default})".replace("%", "%%")
    if flag.kind is bool:
        ap.add_argument(*flag.flags, dest=flag.name, action=argparse.BooleanOptionalAction, default=None, help=help_)
    elif flag.repeat:
        ap.add_argument(*flag.flags, dest=flag.name, action="append", metavar="NAME[=WEIGHT]", help=help_)
    else:
        ap.add_argument(*flag.flags, dest=flag.name, type=flag.kind, choices=flag.choices, default=None, help=help_)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m realtime", description=__doc__)
    for flag in flags(JamSettings):
        _add(ap, flag)
    return ap


def parse_args(argv: list[str] | None = None) -> JamSettings:
    """Flags -> validated JamSettings (ValueError names the key)."""
    given = {k: v for k, v in vars(build_parser().parse_args(argv)).items() if v is not None}
    if "adapters" in given:
        given["adapters"] = parse_adapters(given["adapters"])
    if "input_file" in given:
        given.setdefault("transport", "file")
    return JamSettings.build(given)


def main(argv: list[str] | None = None) -> int:
    """Run a session; print its summary as JSON. Returns the exit code."""
    for key, value in {"HF_HUB_OFFLINE": "1", "MLFLOW_DISABLE_TELEMETRY": "true"}.items():
        os.environ.setdefault(key, value)
    try:
        settings = parse_args(argv)
    except ValueError as err:
        print(err, file=sys.stderr)
        return 2
    from realtime.bundle import BundleError
    from realtime.runner import run_jam
    from realtime.transport import TransportError

    try:
        print(json.dumps(run_jam(settings)))
    except (BundleError, TransportError) as err:
        print(err, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
