"""torchrun (torch.distributed.run) for preemptible jobs: `python -m rwkv7_train.torchrun [torchrun args]`.

Plain torchrun dies on SIGUSR1 and leaves its workers running, SIGKILLs them 30 s after a SIGTERM, and exits 1
whatever status the workers had. Here SIGTERM/SIGUSR1 reach every training process of this node (each saves a
checkpoint and exits 75, see checkpointing.py) and the launcher exits 75 too, so a job script knows to requeue.
"""
import os
import signal
import sys

from rwkv7_train.errors import PREEMPTED  # light: the package imports nothing heavy until asked


def children():
    """Pids of this process's children: the training processes (torchrun starts each in a session of its own,
    so a signal sent to this process's group does not reach them)."""
    me = str(os.getpid())
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                ppid = f.read().rpartition(")")[2].split()[1]
        except (OSError, IndexError):  # exited meanwhile
            continue
        if ppid == me:
            yield int(pid)


def forward(signum, _frame):
    pids = list(children())
    if not pids:  # none running (waiting for the other nodes, or done): nothing to save
        sys.exit(PREEMPTED)
    for pid in pids:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass


for sig in (signal.SIGTERM, signal.SIGUSR1):  # before importing torch, which takes seconds
    signal.signal(sig, forward)
# torch >= 2.9 reads this: leave SIGTERM to `forward` (torch < 2.9 handles SIGTERM itself; SIGUSR1 still works).
os.environ["PET_SIGNALS_TO_HANDLE"] = "SIGINT,SIGHUP,SIGQUIT"

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError  # noqa: E402
from torch.distributed.run import parse_args, run  # noqa: E402

try:
    run(parse_args(sys.argv[1:]))
except ChildFailedError as e:
    _, first = e.get_first_failure()
    # Preempted: the first rank to stop had saved the checkpoint and exited 75, and the others exited 75 too or
    # were killed (negative status) by torchrun's cleanup while exiting.
    if first.exitcode == PREEMPTED and all(f.exitcode == PREEMPTED or f.exitcode < 0 for f in e.failures.values()):
        sys.exit(PREEMPTED)
    sys.exit(first.exitcode if first.exitcode > 0 and first.exitcode != PREEMPTED else 1)
