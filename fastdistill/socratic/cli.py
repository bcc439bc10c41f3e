"""``fastdistill socratic [build|train|eval] --config SOC.yaml [key=value ...]``.

No sub-command runs the three stages in one process. ``build`` (the teacher stage) also runs under the launcher:

    deepspeed --num_gpus G --module fastdistill.socratic build --config SOC.yaml
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    stage = argv.pop(0) if argv and argv[0] in ("build", "train", "eval") else "all"
    p = argparse.ArgumentParser(prog=f"fastdistill socratic {stage if stage != 'all' else ''}".strip())
    p.add_argument("--config", required=True, help="the run's YAML file (see configs/socratic_*.yaml)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help="set by the deepspeed launcher")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_args(argv)
    from fastdistill.generate.prompts import PromptError
    from fastdistill.socratic.config import load_config
    from fastdistill.train.config import ConfigError

    try:
        cfg = load_config(args.config, args.overrides)
    except (ConfigError, PromptError) as e:
        print(f"fastdistill socratic: config error: {e}", file=sys.stderr)
        return 2
    from fastdistill.train.cli import _environment

    _environment()
    from fastdistill.generate.run import ResumeError
    from fastdistill.socratic import pipeline

    try:
        if stage in ("build", "all"):
            pipeline.teacher_stage(cfg)
        if stage in ("train", "all"):
            pipeline.train_students(cfg, args.config)
        if stage in ("eval", "all"):
            pipeline.evaluate(cfg)
    except (PromptError, ResumeError, FileNotFoundError) as e:
        print(f"fastdistill socratic: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
