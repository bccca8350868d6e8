"""Stopping well: signals become a checkpoint and an exit, a SLURM job requeues itself, a rank whose
launcher died stops instead of training on as an orphan, and a rank that hangs says where and exits.

Exit codes (docs/training.md): 0 finished or requeued, 143 stopped by a signal after saving,
``EXIT_HUNG`` when the watchdog fired, 2 for an invalid config.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import signal
import subprocess
import sys
import threading
import time

log = logging.getLogger("iais_scale")

EXIT_INTERRUPTED = 143  # 128 + SIGTERM: stopped by a signal (any of them), checkpoint saved
EXIT_HUNG = 124  # the watchdog saw no progress (as `timeout` reports a hang)
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)
REPEAT_WINDOW_S = 5.0  # launchers forward one request several times (SIGINT, then SIGTERM)


class StopTraining(Exception):
    """Raised on a signal after the checkpoint is saved; ``code`` is the process exit code."""

    def __init__(self, code: int):
        self.code = code
        super().__init__(f"stopped by a signal (exit code {code})")


class Preemption:
    """The stop requests of one rank: signals, and the death of the launcher that started it."""

    def __init__(self, rank: int):
        self.rank = rank
        self.signum: int | None = None
        self._first_at = 0.0
        self._watch: threading.Thread | None = None
        self._installed = False

    def install(self) -> None:
        """SIGUSR1/SIGTERM/SIGINT: finish the step, save, stop. Repeats within seconds are the same
        request (SLURM and DeepSpeed's launchers forward one); a later one exits at once. Installed
        by ``cli.train`` (``launchers/train.py``, ``iais-train``) before anything else, so a request
        during start-up is kept and the run stops at its first agreement point."""
        if self._installed:
            return
        self._installed = True
        for s in STOP_SIGNALS:
            signal.signal(s, self._handler)
        self._watch_launcher()

    def _handler(self, signum, frame) -> None:
        if self.signum is not None:
            if time.monotonic() - self._first_at < REPEAT_WINDOW_S:
                return
            os._exit(128 + signum)  # the user insists
        self.signum, self._first_at = signum, time.monotonic()
        log.warning("rank %d: got signal %d; stopping after this step", self.rank, signum)

    def request(self, signum: int, why: str) -> None:
        if self.signum is None:
            self.signum, self._first_at = signum, time.monotonic()
            log.warning("rank %d: %s; stopping after this step", self.rank, why)

    def _watch_launcher(self) -> None:
        """Under DeepSpeed's launcher, stop when it or the ``deepspeed`` runner above it dies
        (``kill RUNNER`` leaves the per-node launcher, and us, running as orphans otherwise)."""
        try:
            import psutil

            launcher = psutil.Process().parent()
        except Exception:  # no psutil, or no permission: nothing to watch
            return
        if launcher is None or "deepspeed.launcher.launch" not in " ".join(_cmdline(launcher)):
            return
        chain = [launcher]
        ppid, runner, runner_alive = None, None, False
        try:
            # Read now, not from a chain built a moment ago: a runner dying meanwhile is either still
            # the parent (alive, watched below) or already gone, its launcher handed to init.
            ppid = launcher.ppid()
            runner = psutil.Process(ppid)
            runner_alive = runner.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            pass
        if launcher.pid != 1 and (ppid == 1 or not runner_alive):
            # The ``deepspeed`` runner died before this rank started watching.
            self.request(signal.SIGTERM, f"the launcher process {launcher.pid} has lost its deepspeed runner")
            return
        if "deepspeed" in " ".join(_cmdline(runner)):
            chain.append(runner)  # (else srun, pdsh's shell or a script started the launcher: watch it only)
        watched = [(p.pid, p.create_time()) for p in chain]

        def loop() -> None:
            while self.signum is None:
                for pid, created in watched:
                    try:
                        p = psutil.Process(pid)
                        # A dead parent whose own parent has not reaped it yet is a zombie.
                        alive = p.create_time() == created and p.status() != psutil.STATUS_ZOMBIE
                    except psutil.Error:
                        alive = False
                    if not alive:
                        self.request(signal.SIGTERM, f"the launcher process {pid} is gone")
                        return
                time.sleep(1.0)

        self._watch = threading.Thread(target=loop, name="launcher-watch", daemon=True)
        self._watch.start()

    def agreed(self) -> int:
        """The stop request any rank has (0 if none): every rank stops at the same step."""
        import torch  # here, not at the top: ``install`` runs before torch is imported
        import torch.distributed as dist

        flag = torch.tensor([self.signum or 0], dtype=torch.int64)
        if dist.is_initialized():
            if dist.get_backend() == "nccl":
                flag = flag.cuda()
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())


def ignore_while_exiting() -> None:
    """Called once the run is over on every rank and only the process exit is left. Python's exit
    restores the default handlers before its slowest part (destructors: data workers joined, process
    group freed), so a repeat of the stop request arriving then, which SLURM's and DeepSpeed's
    launchers send, would kill the rank by that signal and lose its exit code (143 became 254)."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)


def shield_data_worker(_worker_id: int = 0) -> None:
    """``worker_init_fn`` of the training loader: a data worker outlives every stop request until
    its rank has saved. On Ctrl-C DeepSpeed's launcher SIGTERMs each rank's whole process tree, and
    SLURM signals every process of a step; a worker dying then makes PyTorch raise in the rank
    (``DataLoader worker ... is killed by signal``) mid-step or mid-save, and the checkpoint is lost.
    The rank itself still ends its workers: a SIGTERM sent by the parent exits, as PyTorch's own
    worker handler does; one from anyone else is dropped. A worker of a rank that dies exits by
    PyTorch's parent watch."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # threads started later inherit it
    parent = os.getppid()

    def wait() -> None:
        while True:
            info = signal.sigwaitinfo({signal.SIGTERM})
            if info.si_pid == parent:
                os._exit(0)

    threading.Thread(target=wait, name="stop-shield", daemon=True).start()


def _cmdline(p) -> list[str]:
    try:
        return p.cmdline()
    except Exception:
        return []


def requeue(rank: int, saved: str) -> bool:
    """Ask SLURM to requeue this job (rank 0 asks, every rank learns the answer). With
    ``IAIS_REQUEUE_HOLD=1`` the job is parked (``requeuehold``) until ``scontrol release``, so that
    its allocation can be changed first (``scontrol update JobId=... NumNodes=...``)."""
    import torch
    import torch.distributed as dist

    job = os.environ.get("SLURM_JOB_ID")
    ok = torch.zeros(1)
    if rank == 0 and job:
        verb = "requeuehold" if os.environ.get("IAIS_REQUEUE_HOLD", "0") not in ("", "0") else "requeue"
        log.warning("checkpoint %s saved; asking SLURM to requeue job %s (scontrol %s)", saved, job, verb)
        try:
            result = subprocess.run(["scontrol", verb, job], capture_output=True, text=True, timeout=60)
            ok[0] = float(result.returncode == 0)
            if result.returncode:
                log.error("scontrol requeue failed (%s): stopping as interrupted", result.stderr.strip())
        except (OSError, subprocess.TimeoutExpired) as e:
            log.error("scontrol requeue failed (%s): stopping as interrupted", e)
    if dist.is_initialized():
        if dist.get_backend() == "nccl":
            ok = ok.cuda()
        dist.broadcast(ok, src=0)
    return bool(ok.item())


class Watchdog:
    """Exits the rank (``EXIT_HUNG``) after ``timeout_s`` without a ``beat``, first logging what it
    was doing and every thread's stack, so a job stuck in a collective never hangs silently."""

    def __init__(self, rank: int, timeout_s: float):
        self.rank, self.timeout_s = rank, timeout_s
        self.stage, self._last = "start-up", time.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def beat(self, stage: str) -> None:
        self.stage, self._last = stage, time.monotonic()

    def start(self) -> None:
        if self.timeout_s <= 0:
            return
        self._thread = threading.Thread(target=self._run, name="watchdog", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(min(5.0, self.timeout_s / 4)):
            idle = time.monotonic() - self._last
            if idle > self.timeout_s:
                log.error("rank %d: no progress for %.0f s (last: %s); exiting with code %d (train.watchdog_s)."
                          " Stacks follow.", self.rank, idle, self.stage, EXIT_HUNG)
                faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
                sys.stderr.flush()
                os._exit(EXIT_HUNG)


def stop_code(signum: int, rank: int, saved: str | None, step: int) -> int:
    """The exit code of a run stopped by an agreed ``signum`` after saving ``saved`` (None: asked during
    start-up, nothing new to save): 0 once SLURM requeued the job (SIGUSR1 under SLURM), else
    ``EXIT_INTERRUPTED``. Rank 0 says what happened."""
    if signum == signal.SIGUSR1 and os.environ.get("SLURM_JOB_ID"):
        return 0 if requeue(rank, saved or "(none new)") else EXIT_INTERRUPTED
    if rank == 0 and saved:
        log.warning("checkpoint %s saved; stopping (exit code %d)", saved, EXIT_INTERRUPTED)
    elif rank == 0:
        log.warning("stop requested during start-up; stopping before step %d, nothing to save (exit code %d)",
                    step + 1, EXIT_INTERRUPTED)
    return EXIT_INTERRUPTED
