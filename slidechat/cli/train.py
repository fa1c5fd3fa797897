"""``slidechat train CONFIG [xtuner train flags...]``: [slides, cytology] ``xtuner train`` with an exit status that tells the truth.

Runs the very training ``xtuner train`` runs — xtuner's own ``xtuner/tools/train.py`` with the same
flags (``--work-dir``, ``--deepspeed``, ``--resume``, ``--seed``, ``--cfg-options``, ``--launcher``) and
the same multi-GPU convention (``NPROC_PER_NODE``, ``NNODES``, ``NODE_RANK``, ``ADDR``, ``PORT`` ->
``torchrun``) — but returns the training's exit status. xtuner 0.2.0's launcher ignores its child's
status, so ``xtuner train`` exits 0 after a failed run and scripts/schedulers cannot tell; use
``slidechat train`` in scripts.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import signal
import subprocess
import sys
from typing import List

from slidechat.utils.errors import SlideChatError

logger = logging.getLogger(__name__)


def register(subparsers: "argparse._SubParsersAction") -> None:
    p = subparsers.add_parser(
        "train", help="[slides, cytology] train with a config (xtuner train, with a truthful exit status)",
        description=__doc__.splitlines()[0],
        epilog="Every argument after CONFIG goes to xtuner's train script unchanged, e.g. --work-dir DIR "
               "--deepspeed configs/deepspeed/deepspeed_zero2.json --resume CKPT --seed 0 --cfg-options "
               "k=v. Multi-GPU: NPROC_PER_NODE=8 slidechat train CONFIG ... (as xtuner).")
    p.add_argument("config", help="training config (configs/slidechat/stage_1.py, ...)")
    p.add_argument("xtuner_args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    p.set_defaults(func=run)


def train_command(config: str, xtuner_args: List[str]) -> List[str]:
    """The command ``xtuner train CONFIG ARGS`` runs (same script, same launcher rule), with this
    interpreter instead of whichever ``python`` is first on PATH."""
    from xtuner.tools import train as xtuner_train

    script = os.path.abspath(xtuner_train.__file__)
    args = [config, *xtuner_args]
    slurm = any(a == "--launcher" and b == "slurm" for a, b in zip(args, args[1:]))
    nnodes = int(os.environ.get("NNODES", 1))
    nproc = int(os.environ.get("NPROC_PER_NODE", 1))
    if slurm or (nnodes == 1 and nproc == 1):
        return [sys.executable, script, *args]
    port = os.environ.get("PORT") or str(random.randint(20000, 29999))
    return [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nnodes}",
            f"--node_rank={os.environ.get('NODE_RANK', 0)}", f"--nproc_per_node={nproc}",
            f"--master_addr={os.environ.get('ADDR', '127.0.0.1')}", f"--master_port={port}",
            script, *args, "--launcher", "pytorch"]


#: what torchrun would set for a world of one; DeepSpeed needs all of them, else it looks for MPI
SINGLE_PROCESS_DIST_ENV = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}


def single_process_env(cmd: List[str], xtuner_args: List[str], env: dict) -> dict:
    """``env`` plus the torch.distributed variables of a one-process world when ``--deepspeed`` runs
    without torchrun (one GPU, or a CPU) and none of them is set yet: xtuner sets only LOCAL_RANK, and
    DeepSpeed then falls back to MPI discovery (``No module named 'mpi4py'``). A variable the user set
    is never overwritten; a free port is picked for MASTER_PORT."""
    wants_ds = any(a == "--deepspeed" or a.startswith("--deepspeed=") for a in xtuner_args)
    launched = "torch.distributed.run" in cmd or "--launcher" in xtuner_args
    if not wants_ds or launched or any(k in env for k in (*SINGLE_PROCESS_DIST_ENV, "MASTER_PORT")):
        return env
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    logger.info("one process with --deepspeed: setting RANK=0 WORLD_SIZE=1 LOCAL_RANK=0 "
                "MASTER_ADDR=127.0.0.1 MASTER_PORT=%d", port)
    return {**env, **SINGLE_PROCESS_DIST_ENV, "MASTER_PORT": str(port)}


def run(args: argparse.Namespace) -> int:
    if not os.path.isfile(args.config):
        raise SlideChatError("config file not found", args.config)
    extra = list(args.xtuner_args)
    if extra[:1] == ["--"]:
        extra = extra[1:]
    cmd = train_command(args.config, extra)
    env = dict(os.environ)
    # xtuner re-executes a bare `python`; keep this interpreter's folder first for any child it starts
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env = single_process_env(cmd, extra, env)
    logger.debug("running %s", " ".join(cmd))
    proc = subprocess.Popen(cmd, env=env)
    try:
        rc = proc.wait()
    except KeyboardInterrupt:  # the child got the same SIGINT; let it finish its own shutdown
        rc = proc.wait()
    if rc < 0:  # killed by a signal: the shell convention
        name = signal.Signals(-rc).name if -rc in signal.Signals._value2member_map_ else str(-rc)
        logger.error("training was killed by %s", name)
        return 128 - rc
    if rc != 0:
        logger.error("training failed (exit status %d); see the messages above and the work dir's log", rc)
    return rc
