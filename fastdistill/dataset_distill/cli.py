"""``fastdistill dataset-distill {experts,run,evaluate,all} --config run.yaml [key=value ...]``.

``key=value`` overrides use the same syntax as ``fastdistill train`` (``distill.iterations=50``, values parsed as YAML).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from fastdistill._config import check_writable
from fastdistill.dataset_distill.config import ConfigError, RunConfig, load_config
from fastdistill.dataset_distill.data import DataError


def _setup(cfg: RunConfig) -> None:
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="fastdistill dataset-distill", description="Dataset distillation by matching training trajectories (MTT)."
    )
    parser.add_argument(
        "command",
        choices=("experts", "run", "evaluate", "all"),
        help="experts: train expert trajectories; run: distil; evaluate: distilled vs random real; "
        "all: the three in order (each resumes where it stopped)",
    )
    parser.add_argument("--config", required=True, help="YAML run file (see configs/mtt_*.yaml)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="override config keys, values parsed as YAML (e.g. distill.iterations=50), as in fastdistill train",
    )
    args = parser.parse_args(argv)
    cfg = None
    try:
        cfg = load_config(args.config, args.overrides)
        check_writable("run_dir", cfg.run_dir)
        if cfg.data.root is not None and not os.path.isdir(cfg.data.root):
            raise ConfigError(
                f"data.root: {cfg.data.root!r} is not a folder; expected the folder holding the dataset's IDX files "
                "(or null: Debian's /usr/share/datasets/fashion-mnist)"
            )
        _setup(cfg)
        progress = not args.no_progress
        if args.command in ("experts", "all"):
            from fastdistill.dataset_distill.experts import train_experts

            train_experts(cfg, progress=progress)
        if args.command in ("run", "all"):
            from fastdistill.dataset_distill.distill import distill

            distill(cfg, progress=progress)
        if args.command in ("evaluate", "all"):
            from fastdistill.dataset_distill.evaluate import evaluate

            evaluate(cfg, progress=progress)
    except ConfigError as err:
        print(f"fastdistill dataset-distill: config error: {err}", file=sys.stderr)
        return 2
    except (DataError, FileNotFoundError) as err:
        print(f"fastdistill dataset-distill: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        where = f" in {cfg.run_dir!r}" if cfg is not None else ""
        print(
            f"\nfastdistill dataset-distill: interrupted; finished experts and checkpoints stay{where}: "
            "the same command resumes from them",
            file=sys.stderr,
        )
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
