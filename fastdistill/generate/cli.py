"""``fastdistill generate --config GEN.yaml [key=value ...]``, also under the DeepSpeed launcher:

    deepspeed --num_gpus G --module fastdistill.generate --config GEN.yaml [key=value ...]

A run resumes in its output folder: prompts already in a part file are not generated again.
"""

from __future__ import annotations

import argparse
import sys


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="fastdistill generate",
        description="Sample N continuations per prompt from the (ZeRO-3 sharded) teacher into a Parquet/JSONL dataset.",
    )
    p.add_argument("--config", required=True, help="the run's YAML file (see configs/generate_*.yaml)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help="set by the deepspeed launcher")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="override config keys (values parsed as YAML)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    from fastdistill.generate.config import load_config
    from fastdistill.generate.prompts import PromptError
    from fastdistill.train.config import ConfigError

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"fastdistill generate: config error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        import yaml

        print(yaml.safe_dump(cfg, sort_keys=False), end="")
        return 0
    from fastdistill.train.cli import _environment

    _environment()
    from fastdistill.generate.run import ResumeError, run

    try:
        run(cfg)
    except (PromptError, ResumeError) as e:
        print(f"fastdistill generate: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
