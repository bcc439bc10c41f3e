"""``fastdistill weak-label --config WL.yaml [key=value ...]`` (also ``deepspeed --module fastdistill.weak_label``);
``fastdistill weak-label prepare-vader SDIST.tar.gz`` unpacks the VADER sentences into the cache (``make
data-weak-labels`` calls it)."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["prepare-vader"]:
        if len(argv) != 2:
            print("usage: fastdistill weak-label prepare-vader vaderSentiment-3.3.2.tar.gz", file=sys.stderr)
            return 2
        from fastdistill.weak_label.data import prepare_vader

        print(f"fastdistill: VADER rated sentences in {prepare_vader(argv[1])}")
        return 0
    p = argparse.ArgumentParser(
        prog="fastdistill weak-label",
        description="Teacher chains -> aggregated soft labels -> a small student classifier, scored on held-out text.",
    )
    p.add_argument("--config", required=True, help="the run's YAML file (see configs/weak_labels_*.yaml)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help="set by the deepspeed launcher")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="override config keys (values parsed as YAML)")
    args = p.parse_args(argv)
    from fastdistill.generate.prompts import PromptError
    from fastdistill.train.config import ConfigError
    from fastdistill.weak_label.config import load_config

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"fastdistill weak-label: config error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        import yaml

        print(yaml.safe_dump(cfg, sort_keys=False), end="")
        return 0
    from fastdistill.train.cli import _environment

    _environment()
    from fastdistill.generate.run import ResumeError
    from fastdistill.weak_label.run import run

    try:
        run(cfg)
    except (PromptError, ResumeError, FileNotFoundError) as e:
        print(f"fastdistill weak-label: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
