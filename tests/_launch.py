"""Shared helpers of the multi-process tests: the real ``deepspeed`` launcher on CPU (gloo), loopback only, a fresh
port per launch, a timeout on every wait, and the run folder's logs read back.

    from _launch import REPO, launched, launch, check, metrics

    @launched                                    # cpu_only + slow + skipped where the launcher is not installed
    def test_x(tmp_path):
        out = str(tmp_path / "run")
        check(launch("fastdistill.train", ["--config", CFG, f"run.output_dir={out}"], nproc=2))
        losses = metrics(out)                    # {step: {"train/loss": ..., ...}}

``launch(module, args, nproc)`` runs ``deepspeed --num_gpus nproc --master_addr 127.0.0.1 --master_port <free>
--module module args`` (``nproc=None``: one plain ``python -m module args``) and returns the ``CompletedProcess``;
``launch_nodes`` starts one launcher per simulated node (``--hostfile --no_ssh --node_rank``). On a timeout the whole
process group (the launcher and every rank it started) is killed before ``subprocess.TimeoutExpired`` is raised, so a
hung test never leaves ranks behind.
"""

from __future__ import annotations

import csv
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, "configs")
_BIN = os.path.dirname(sys.executable)
DEEPSPEED = (
    os.path.join(_BIN, "deepspeed") if os.path.exists(os.path.join(_BIN, "deepspeed")) else shutil.which("deepspeed")
)
# seconds any one launch may take (a 2-core CI machine, tiny models); raise it on a loaded shared machine
TIMEOUT = float(os.environ.get("FASTDISTILL_TEST_LAUNCH_TIMEOUT", "420"))
_LAUNCH_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT", "CUDA_VISIBLE_DEVICES")

needs_launcher = pytest.mark.skipif(DEEPSPEED is None, reason="deepspeed launcher not found")


def launched(test):
    """Marks of a multi-process test: CPU only, slow, and skipped where the ``deepspeed`` launcher is missing. Works on
    a function or a class; ``pytestmark = LAUNCHED`` does the same for a whole module."""
    for mark in LAUNCHED:
        test = mark(test)
    return test


# ``launched`` selects the multi-process tests (``pytest -m launched`` / ``-m "not launched"``)
LAUNCHED = [pytest.mark.cpu_only, pytest.mark.slow, pytest.mark.launched, needs_launcher]

# Master ports: every pytest-xdist worker draws from its own block below Linux's ephemeral range (32768-60999, where
# bind(0) and gloo's connections land), in steps of 2 from an offset of its own process id (another session on a
# shared machine starts elsewhere in the block), never the same port twice: no two launches of one session, in one
# worker or two, are handed the same port.
_PORT_BASE, _PORT_BLOCK = 20000, 1500
_ports_handed = 0


def _worker_index() -> int:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")  # "gw0", "gw1", ... (unset without xdist)
    return int(worker[2:]) % 8 if worker[2:].isdigit() else 0


def free_port() -> int:
    """A free loopback port (for ``--master_port``: every launch its own, unique across pytest-xdist workers)."""
    global _ports_handed
    first, slots = _PORT_BASE + _worker_index() * _PORT_BLOCK, _PORT_BLOCK // 2
    offset = os.getpid() * 7919 % slots
    while _ports_handed < slots:
        port = first + 2 * ((offset + _ports_handed) % slots)  # port + 1 stays free too, for a second listener
        _ports_handed += 1
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:  # in use outside this session: the next one
                continue
        return port
    raise RuntimeError(f"no free port left in {first}..{first + _PORT_BLOCK - 1}")


def run_env(**extra: str) -> dict:
    """The environment of a launched process: this one's without the launcher's rank variables (and without
    ``TRITON_INTERPRET``), DeepSpeed on its CPU accelerator with no op builds, offline, one thread per rank, this
    checkout first on ``PYTHONPATH``; ``extra`` last."""
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCH_VARS + ("TRITON_INTERPRET",)}
    env.update(
        DS_ACCELERATOR="cpu",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        DS_BUILD_OPS="0",
        OMP_NUM_THREADS="1",
        PYTHONPATH=REPO + os.pathsep + env.get("PYTHONPATH", ""),
    )
    env.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(REPO, ".cache", "torch_extensions"))
    env.update(extra)
    return env


def deepspeed_cmd(module: str, args: list[str], nproc: int | None, port: int | None = None) -> list[str]:
    """``deepspeed --num_gpus nproc ... --module module args``, or ``python -m module args`` for ``nproc=None``."""
    if nproc is None:
        return [sys.executable, "-m", module, *args]
    port = port or free_port()
    return [DEEPSPEED, "--num_gpus", str(nproc), "--master_addr", "127.0.0.1", "--master_port", str(port)] + [
        "--module",
        module,
        *args,
    ]


def _default_sigint() -> None:
    # a suite started in the background by a shell without job control (`make test &`, `nohup ... &`) inherits
    # SIGINT and SIGQUIT ignored, and Python then installs no KeyboardInterrupt handler: give the child a terminal's
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGQUIT, signal.SIG_DFL)


def start(cmd: list[str], env: dict | None = None) -> subprocess.Popen:
    """Start ``cmd`` in the checkout with :func:`run_env` (``env`` added), in its own process group, output piped,
    SIGINT / SIGQUIT at their defaults (as from a terminal, whatever the suite inherited)."""
    return subprocess.Popen(
        cmd,
        cwd=REPO,
        env=run_env(**(env or {})),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group: a timeout kills the launcher and every rank it started
        preexec_fn=_default_sigint,
    )


def kill(proc: subprocess.Popen) -> None:
    """SIGKILL ``proc``'s whole process group (a process started by :func:`start`)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def finish(procs: list[subprocess.Popen], timeout: float = TIMEOUT) -> list[subprocess.CompletedProcess]:
    """Wait for every process of ``procs`` (one shared deadline); on a timeout kill them all, then raise. Each result
    has ``ended_at`` (``time.time()`` when it was seen to end: an upper bound for all but the first)."""
    deadline, results = time.time() + timeout, []
    for p in procs:
        try:
            stdout, stderr = p.communicate(timeout=max(deadline - time.time(), 1))
        except subprocess.TimeoutExpired:
            for q in procs:
                kill(q)
            for q in procs:
                q.communicate()
            raise
        result = subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr)
        result.ended_at = time.time()
        results.append(result)
    return results


def run(cmd: list[str], env: dict | None = None, timeout: float = TIMEOUT) -> subprocess.CompletedProcess:
    """Run ``cmd`` to its end (see :func:`start`, :func:`finish`)."""
    return finish([start(cmd, env)], timeout)[0]


def launch(
    module: str, args: list[str], nproc: int | None = 2, env: dict | None = None, timeout: float = TIMEOUT
) -> subprocess.CompletedProcess:
    """``module`` under the ``deepspeed`` launcher with ``nproc`` processes (``None``: one plain process)."""
    return run(deepspeed_cmd(module, args, nproc), env, timeout)


def launch_nodes(
    module: str, args: list[str], hostfile: str, env: dict | None = None, timeout: float = TIMEOUT
) -> list[subprocess.CompletedProcess]:
    """A multi-node launch simulated on this machine: ``deepspeed --hostfile H --no_ssh --node_rank R`` once per
    line of ``hostfile``, all at once on one port; the results in node order."""
    with open(hostfile) as f:
        nodes = [line for line in f.read().splitlines() if line.strip() and not line.lstrip().startswith("#")]
    port, procs = free_port(), []
    for node_rank in range(len(nodes)):
        cmd = [DEEPSPEED, "--hostfile", hostfile, "--no_ssh", "--node_rank", str(node_rank)]
        cmd += ["--master_addr", "127.0.0.1", "--master_port", str(port), "--module", module, *args]
        procs.append(start(cmd, env))
    return finish(procs, timeout)


def output(proc: subprocess.CompletedProcess, tail: int = 6000) -> str:
    """Exit code and the last ``tail`` characters of stdout and stderr: the message of a failed assertion."""
    return f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-tail:]}\n--- stderr\n{proc.stderr[-tail:]}"


def check(proc: subprocess.CompletedProcess) -> None:
    """Assert that ``proc`` exited 0, showing its output if not."""
    assert proc.returncode == 0, output(proc)


def metrics(folder: str, keys: tuple[str, ...] = ("train/loss", "train/kd", "train/ce")) -> dict[int, dict]:
    """The training rows of ``folder/metrics.csv``: ``{step: {key: value}}`` for the ``keys`` the rows have."""
    with open(os.path.join(folder, "metrics.csv")) as f:
        return {
            int(r["step"]): {k: float(r[k]) for k in keys if r.get(k)} for r in csv.DictReader(f) if r.get("train/loss")
        }


def assert_same_trajectory(got: dict, ref: dict, steps: int) -> None:
    """Two ``metrics`` results (a pool's run and its colocated reference) have the same steps 1..``steps``, the same
    keys per step, and every value equal to rel 1e-6 (the pools tests' one trajectory check)."""
    assert sorted(got) == sorted(ref) == list(range(1, steps + 1))
    for step in ref:
        assert set(got[step]) == set(ref[step]), (step, got[step], ref[step])
        for k in ref[step]:
            assert got[step][k] == pytest.approx(ref[step][k], rel=1e-6, abs=1e-7), (step, k, got[step], ref[step])


def losses(folder: str) -> dict[int, float]:
    """``{step: train/loss}`` of ``folder/metrics.csv``."""
    return {step: row["train/loss"] for step, row in metrics(folder, ("train/loss",)).items()}


def save_tiny_teacher(folder: str, config: str = os.path.join(CONFIGS, "tiny_llama_zero3.yaml"), seed: int = 0) -> str:
    """The ``teacher.config`` of ``config`` with random weights drawn from ``seed``, saved (safetensors) to
    ``folder``: a teacher the launched runs load with ``teacher.model=folder teacher.config=null``."""
    import torch
    import transformers
    import yaml

    with open(config) as f:
        cfg = dict(yaml.safe_load(f)["teacher"]["config"])
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(
        transformers.AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    )
    model.save_pretrained(folder, safe_serialization=True)
    return folder
