"""The one training entry point: `jam train`, `jam stage pretrain|finetune` and `python -m pipeline.train`
(also under `accelerate launch -m pipeline.train` for several processes) all come through `train_stages`.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable

from pipeline.core import constants as C
from pipeline.core.config import Config, ConfigError, load_config
from pipeline.core.graph import names, run_stage
from pipeline.core.profile import export_env

TRAIN_STAGES = names("train")


def configure_logging() -> None:
    """Progress lines (`step 12/120 ...`, `checkpoint step 40 -> ...`) from `pipeline.*` loggers to stderr."""
    logger = logging.getLogger("pipeline")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)


def train_errors() -> tuple[type[Exception], ...]:
    """Exceptions that mean "fix the input", shown as one line (no traceback) by the command lines."""
    from pipeline.train.checkpoint import CheckpointError
    from pipeline.train.dataset import TrainInputError
    from pipeline.train.model import VocabMismatch

    return (ConfigError, TrainInputError, CheckpointError, VocabMismatch)


def stages_for(which: str) -> tuple[str, ...]:
    """`all` -> every training stage in graph order; a stage name -> just it."""
    if which == "all":
        return TRAIN_STAGES
    if which not in TRAIN_STAGES:
        raise ValueError(f"--stage must be {', '.join(TRAIN_STAGES)} or all, got {which!r}")
    return (which,)


def train_stages(
    cfg: Config, which: str, fresh: bool, echo: Callable[[str], None], error: Callable[[str], None]
) -> int:
    """Run the training stage(s) in this process.

    Returns:
        0, 1 (bad input: the message went to `error`), or `EXIT_PREEMPTED` (checkpointed on SIGTERM; re-run).
    """
    from pipeline.train.checkpoint import Preempted

    configure_logging()
    for name in stages_for(which):
        try:
            report = run_stage(name, cfg, fresh=fresh)
        except Preempted as err:
            error(str(err))
            return C.EXIT_PREEMPTED
        except train_errors() as err:
            error(f"{name}: {err}")
            return 1
        if int(os.environ.get("RANK", "0")) == 0:  # one summary line for several processes
            echo(report.summary())
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m pipeline.train [--stage S] [--params P] [--set k=v ...] [--fresh]`."""
    parser = argparse.ArgumentParser(prog="python -m pipeline.train", description="Train the base and/or adapter.")
    parser.add_argument("--stage", default="all", help=f"{', '.join(TRAIN_STAGES)} or all")
    parser.add_argument("--params", "-p", default="params.yaml", help="params file (YAML)")
    parser.add_argument("--set", "-s", action="append", default=[], dest="overrides", help="dotted.key=value")
    parser.add_argument("--fresh", action="store_true", help="discard checkpoints and start a new MLflow run")
    args = parser.parse_args(argv)
    for key, value in C.OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
    try:
        cfg = load_config(args.params, args.overrides)
        which = stages_for(args.stage) and args.stage
    except (ConfigError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    export_env(cfg.services)  # the S3 endpoint of checkpoint.dir, when the profile names one
    return train_stages(cfg, which, args.fresh, print, lambda m: print(f"error: {m}", file=sys.stderr))
