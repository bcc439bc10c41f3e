"""``fastdistill train --config RUN.yaml [key=value ...]``, also the entry point under the DeepSpeed launcher:

    deepspeed [--num_gpus G] [--num_nodes N --hostfile H] --module fastdistill.train --config RUN.yaml [key=value ...]

The launcher appends ``--local_rank=R`` (accepted; the rank comes from the environment). A single process without the
launcher runs as a world of one.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="fastdistill train",
        description="Online distillation of a frozen (ZeRO-3 sharded) teacher into a student trained by DeepSpeed.",
    )
    p.add_argument("--config", required=True, help="the run's YAML file (see configs/)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help="set by the deepspeed launcher")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="override config keys, values parsed as YAML (e.g. schedule.max_steps=20)",
    )
    return p.parse_args(argv)


def _environment() -> None:
    """Before DeepSpeed is imported: CPU accelerator where there is no GPU, offline hub, quiet tokenizers."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    launched = "LOCAL_RANK" in os.environ  # by the deepspeed launcher (a single process sets it later, in the recipe)
    from fastdistill.train import errors
    from fastdistill.train.config import ConfigError, load_config
    from fastdistill.train.resume import RunFinished

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        errors.report(str(e))
        return 2
    if args.print_config:
        import yaml

        print(yaml.safe_dump(cfg, sort_keys=False), end="")
        return 0
    _environment()
    out_dir = cfg["run"]["output_dir"]
    existed = os.path.exists(out_dir)
    try:
        from fastdistill.train.recipe import run

        run(cfg)
    except ConfigError as e:
        errors.remove_if_only_config(out_dir, existed)
        errors.report(str(e))
        return 2
    except RunFinished as e:
        errors.report(str(e), kind="", file=sys.stdout)
        return 0
    except KeyboardInterrupt:
        if errors.rank() == 0:
            # Ctrl-C reaches the deepspeed launcher too, which then terminates every rank: finish this one line first
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            print(file=sys.stderr)  # end the progress bar's line
        errors.report(errors.interrupted(cfg, argv, launched), kind="")
        return 130
    except Exception as e:
        if launched and errors.peer_lost(e):
            print(f"fastdistill train: {errors.lost_peer_line()}", file=sys.stderr, flush=True)
            return 1
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
