"""The ``fastdistill`` command: ``fastdistill train ...`` and ``fastdistill dataset-distill ...``.

Each subcommand lives with its feature (``fastdistill.train.cli``, ``fastdistill.dataset_distill.cli``) and is imported
only when used, so ``fastdistill --help`` stays fast and needs no optional dependency.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "train": ("fastdistill.train.cli", "online distillation of a frozen teacher into a student (DeepSpeed)"),
    "teacher-cache": ("fastdistill.cache.cli", "build / inspect an on-disk cache of a teacher's top-k targets"),
    "generate": ("fastdistill.generate.cli", "sample N continuations per prompt from the teacher into a dataset"),
    "weak-label": ("fastdistill.weak_label.cli", "teacher chains -> aggregated soft labels -> a student classifier"),
    "socratic": ("fastdistill.socratic.cli", "teacher sub-question chains -> question generator + answerer"),
    "text-recognition": ("fastdistill.textrec.cli", "printed + handwriting recognizer distilled from two teachers"),
    "dataset-distill": ("fastdistill.dataset_distill.cli", "condense a dataset by matching training trajectories"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: fastdistill {" + ",".join(COMMANDS) + "} ...\n")
        for name, (_, help_) in COMMANDS.items():
            print(f"  {name:<16} {help_}")
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        print(f"fastdistill: unknown command {cmd!r}; expected one of {tuple(COMMANDS)}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[cmd][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
