"""``fastdistill text-recognition {train-teacher --domain D | distill | evaluate} --config TR.yaml [key=value ...]``."""

from __future__ import annotations

import argparse
import sys

STAGES = ("train-teacher", "distill", "evaluate")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in STAGES:
        got = repr(argv[0]) if argv else "nothing"
        print(f"fastdistill text-recognition: got {got}; expected one of {list(STAGES)}", file=sys.stderr)
        return 2
    stage = argv.pop(0)
    p = argparse.ArgumentParser(prog=f"fastdistill text-recognition {stage}")
    p.add_argument("--config", required=True, help="the run's YAML file (see configs/textrec*.yaml)")
    if stage == "train-teacher":
        p.add_argument("--domain", required=True, choices=("printed", "handwriting"))
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_args(argv)
    from fastdistill.textrec.config import ConfigError, load_config

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"fastdistill text-recognition: config error: {e}", file=sys.stderr)
        return 2
    from fastdistill.textrec import train
    from fastdistill.textrec.data import FontPackageError

    try:
        if stage == "train-teacher":
            train.train_teacher(cfg, args.domain)
        elif stage == "distill":
            train.distill(cfg)
        else:
            train.evaluate(cfg)
    except (ConfigError, FontPackageError, FileNotFoundError) as e:
        print(f"fastdistill text-recognition: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
