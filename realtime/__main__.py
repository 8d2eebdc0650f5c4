"""`python -m realtime --model BUNDLE [...]`: the jam runner without the pipeline (no params.yaml, no pydantic).

The same `run_jam` as `jam play`; every `JamSettings` field is a flag (`--silence-gap-s 0.5`). Adapters as
`--adapters style_a=2,style_b=1` (or `none`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

from realtime.settings import JamSettings

SKIP = {"extra", "adapters"}


def _parse_adapters(text: str) -> dict[str, float]:
    if text == "none":
        return {}
    pairs = (item.partition("=") for item in text.split(",") if item)
    return {name: float(weight) if weight else 1.0 for name, _, weight in pairs}


def _type(field: dataclasses.Field):
    text = str(field.type)
    if "bool" in text:
        return lambda v: v.lower() in ("1", "true", "yes", "on")
    if "Path" in text:
        return Path
    if "float" in text:
        return float
    if "int" in text:
        return int
    return str


def parse_args(argv: list[str] | None = None) -> JamSettings:
    """Flags -> JamSettings (defaults as in the dataclass; --input-file implies --transport file)."""
    ap = argparse.ArgumentParser(prog="python -m realtime", description=__doc__)
    for field in dataclasses.fields(JamSettings):
        if field.name not in SKIP:
            ap.add_argument("--" + field.name.replace("_", "-"), type=_type(field), default=None)
    ap.add_argument("--adapters", type=_parse_adapters, default=None)
    given = {k: v for k, v in vars(ap.parse_args(argv)).items() if v is not None}
    if "input_file" in given:
        given.setdefault("transport", "file")
    return JamSettings(**given)


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
