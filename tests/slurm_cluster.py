"""A real, throw-away SLURM cluster on this one machine: slurmctld + two slurmd emulating nodes n1, n2.

Used by tests/test_slurm.py through the ``slurm_cluster`` fixture (session scope). Needs root: it
installs the Debian packages when missing, starts munged, writes slurm.conf/cgroup.conf under a
temporary folder, starts the daemons in the foreground as our own child processes and tears them
down by PID at the end. Nothing is skipped: if SLURM cannot come up, the tests using it fail with
the reason (daemon logs included).

Concurrent test sessions on one machine (several engineers running the suite) are serialised by an
exclusive lock on /tmp/iais-slurm-cluster.lock, held for the cluster's lifetime: the /etc/hosts line
and the node names are machine-wide.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
NODES = ["n1", "n2"]
HOSTS_LINE = "127.0.0.1 n1 n2  # iais_scale tests/slurm_cluster.py"
LOCK_PATH = "/tmp/iais-slurm-cluster.lock"
FINAL_STATES = {
    "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
    "PREEMPTED",
}


class SlurmError(RuntimeError):
    pass


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_installed() -> None:
    """apt-get install the SLURM daemons, client and munge when any is missing (apt-get update on failure)."""
    needed = ["slurmctld", "slurmd", "sbatch", "scontrol", "munged", "munge", "unmunge"]
    if all(shutil.which(b) or os.path.exists(f"/usr/sbin/{b}") for b in needed):
        return
    if os.geteuid() != 0:
        raise SlurmError(f"SLURM is not installed and we are not root to apt-get install {PACKAGES}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "--no-install-recommends", *PACKAGES]
    p = _run(install, env=env, timeout=900)
    if p.returncode != 0:
        u = _run(["apt-get", "update"], env=env, timeout=900)
        p = _run(install, env=env, timeout=900)
        if p.returncode != 0:
            raise SlurmError(f"apt-get install {PACKAGES} failed:\n{u.stdout[-2000:]}{u.stderr[-2000:]}"
                             f"{p.stdout[-3000:]}{p.stderr[-3000:]}")


def _munge_ok() -> bool:
    try:
        enc = _run(["munge", "-n"], timeout=10)
        if enc.returncode != 0:
            return False
        dec = subprocess.run(["unmunge"], input=enc.stdout, capture_output=True, text=True, timeout=10)
        return dec.returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


class SlurmCluster:
    """slurmctld + slurmd n1, n2 on 127.0.0.1, configured under ``self.dir``; ``self.env`` has SLURM_CONF."""

    def __init__(self, cpus: int | None = None) -> None:
        self.cpus = cpus or os.cpu_count() or 1
        self.dir = Path(tempfile.mkdtemp(prefix="iais-slurm-"))
        self.conf = self.dir / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.procs: dict[str, subprocess.Popen] = {}
        self.munged_pid: int | None = None
        self.added_hosts_line = False
        self._lock_fd: int | None = None

    # ---------------------------------------------------------------- bring-up
    def start(self, timeout: float = 120) -> SlurmCluster:
        self._lock_fd = os.open(LOCK_PATH, os.O_CREAT | os.O_RDWR, 0o666)
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)  # one emulated cluster per machine at a time
        try:
            ensure_installed()
            self._start_munge()
            self._add_hosts_line()
            self._write_conf()
            log = lambda name: open(self.dir / f"{name}.stdout", "w")  # noqa: E731
            self.procs["slurmctld"] = subprocess.Popen(
                ["slurmctld", "-D", "-c", "-f", str(self.conf)], env=self.env,
                stdout=log("slurmctld"), stderr=subprocess.STDOUT, start_new_session=True)
            for n in NODES:
                self.procs[f"slurmd-{n}"] = subprocess.Popen(
                    ["slurmd", "-D", "-N", n, "-f", str(self.conf)], env=self.env,
                    stdout=log(f"slurmd-{n}"), stderr=subprocess.STDOUT, start_new_session=True)
            self._wait_idle(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _start_munge(self) -> None:
        if _munge_ok():  # a munged already serves /run/munge (ours from before, or the machine's)
            return
        Path("/run/munge").mkdir(parents=True, exist_ok=True)
        shutil.chown("/run/munge", "munge", "munge")
        if not Path("/etc/munge/munge.key").exists():
            p = _run(["runuser", "-u", "munge", "--", "/usr/sbin/mungekey", "--create"])
            if p.returncode != 0:
                raise SlurmError(f"mungekey --create failed: {p.stderr}")
        p = _run(["runuser", "-u", "munge", "--", "/usr/sbin/munged"], timeout=30)
        if p.returncode != 0:
            raise SlurmError(f"munged did not start: {p.stdout}{p.stderr}")
        pidfile = Path("/run/munge/munged.pid")
        for _ in range(50):
            if _munge_ok():
                break
            time.sleep(0.1)
        else:
            raise SlurmError("munge -n | unmunge fails after starting munged")
        if pidfile.exists():
            self.munged_pid = int(pidfile.read_text().split()[0])

    def _add_hosts_line(self) -> None:
        hosts = Path("/etc/hosts").read_text()
        names = set()
        for line in hosts.splitlines():
            fields = line.split("#", 1)[0].split()
            if fields and fields[0] == "127.0.0.1":
                names.update(fields[1:])
        if set(NODES) <= names:
            return
        with open("/etc/hosts", "a") as f:
            f.write(("" if hosts.endswith("\n") or not hosts else "\n") + HOSTS_LINE + "\n")
        self.added_hosts_line = True

    def _remove_hosts_line(self) -> None:
        if not self.added_hosts_line:
            return
        lines = Path("/etc/hosts").read_text().splitlines(keepends=True)
        # rewrite in place (on some containers /etc/hosts is a bind mount that cannot be replaced)
        with open("/etc/hosts", "w") as f:
            f.writelines(line for line in lines if line.rstrip("\n") != HOSTS_LINE)
        self.added_hosts_line = False

    def _write_conf(self) -> None:
        host = socket.gethostname().split(".")[0]
        d = self.dir
        for sub in ("state", "spool", *(f"spool/{n}" for n in NODES)):
            (d / sub).mkdir()
        p1, p2 = _free_port(), _free_port()
        while p2 != p1 + 1:  # NodeName=n[1-2] Port=[a-b] wants consecutive ports
            p1 = _free_port()
            p2 = p1 + 1
            try:
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p2))
            except OSError:
                p2 = -1
        self.conf.write_text(f"""\
# Written by tests/slurm_cluster.py: a one-host cluster emulating nodes n1, n2.
ClusterName=iaistest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=cred_expire=10
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool/%n
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd-%n.pid
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
JobRequeue=1
MinJobAge=3600
KillWait=30
InactiveLimit=0
NodeName=n[1-2] NodeHostname={host} NodeAddr=127.0.0.1 Port=[{p1}-{p2}] CPUs={self.cpus} State=UNKNOWN
PartitionName=debug Nodes=n[1-2] Default=YES MaxTime=INFINITE State=UP
""")
        (d / "cgroup.conf").write_text("CgroupPlugin=cgroup/v1\n")

    def _wait_idle(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            for name, p in self.procs.items():
                if p.poll() is not None:
                    raise SlurmError(f"{name} exited with {p.returncode} during start-up\n{self.logs()}")
            r = _run(["sinfo", "-h", "-N", "-o", "%N %t"], env=self.env, timeout=30)
            last = r.stdout + r.stderr
            states = dict(line.split() for line in r.stdout.splitlines() if len(line.split()) == 2)
            if r.returncode == 0 and all(states.get(n) == "idle" for n in NODES):
                return
            time.sleep(0.5)
        raise SlurmError(f"nodes not idle after {timeout:.0f} s; sinfo: {last!r}\n{self.logs()}")

    # ---------------------------------------------------------------- use
    def logs(self, tail: int = 3000) -> str:
        out = []
        for f in sorted(self.dir.glob("*.log")) + sorted(self.dir.glob("*.stdout")):
            text = f.read_text(errors="replace")
            if text.strip():
                out.append(f"--- {f.name} ---\n{text[-tail:]}")
        return "\n".join(out)

    def sbatch(self, args: list[str], cwd: str | Path, env: dict | None = None) -> str:
        """``sbatch --parsable ARGS``; returns the job id."""
        p = _run(["sbatch", "--parsable", *args], cwd=cwd, env={**self.env, **(env or {})}, timeout=60)
        if p.returncode != 0:
            raise SlurmError(f"sbatch {' '.join(args)} failed ({p.returncode}): {p.stderr}{p.stdout}")
        return p.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job -o JOBID`` as a dict (JobState, ExitCode, Restarts, ...)."""
        p = _run(["scontrol", "show", "job", "-o", job_id], env=self.env, timeout=30)
        if p.returncode != 0:
            raise SlurmError(f"scontrol show job {job_id}: {p.stderr}")
        return dict(re.findall(r"(\w+)=(\S*)", p.stdout))

    def wait(self, job_id: str, timeout: float, states: set[str] = FINAL_STATES) -> dict[str, str]:
        """Poll until the job reaches one of ``states`` (default: a final one); returns its record."""
        deadline = time.monotonic() + timeout
        info: dict[str, str] = {}
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            time.sleep(1)
        raise SlurmError(f"job {job_id} not in {sorted(states)} after {timeout:.0f} s: {info}")

    def scontrol(self, *args: str) -> str:
        p = _run(["scontrol", *args], env=self.env, timeout=30)
        if p.returncode != 0:
            raise SlurmError(f"scontrol {' '.join(args)}: {p.stderr}")
        return p.stdout

    def scancel(self, *args: str) -> None:
        p = _run(["scancel", *args], env=self.env, timeout=30)
        if p.returncode != 0:
            raise SlurmError(f"scancel {' '.join(args)}: {p.stderr}")

    # ---------------------------------------------------------------- tear-down
    def _cancel_all(self, timeout: float = 60) -> None:
        if "slurmctld" not in self.procs or self.procs["slurmctld"].poll() is not None:
            return
        try:
            _run(["scancel", "--full", "--signal=KILL", "--user", "root"], env=self.env, timeout=30)
            _run(["scancel", "--user", "root"], env=self.env, timeout=30)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                r = _run(["squeue", "-h", "-o", "%i"], env=self.env, timeout=30)
                if r.returncode != 0 or not r.stdout.strip():
                    return
                time.sleep(1)
        except (OSError, subprocess.TimeoutExpired):
            pass

    def stop(self) -> None:
        self._cancel_all()
        for name in sorted(self.procs, key=lambda n: n != "slurmctld", reverse=True):  # slurmds first
            p = self.procs[name]
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(20)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(10)
            if p.stdout:
                p.stdout.close()
        self.procs.clear()
        if self.munged_pid is not None:
            try:
                os.kill(self.munged_pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            self.munged_pid = None
        self._remove_hosts_line()
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    cluster = SlurmCluster().start()
    try:
        yield cluster
    finally:
        keep = os.environ.get("IAIS_KEEP_SLURM_DIR")
        cluster.stop()
        if not keep:
            shutil.rmtree(cluster.dir, ignore_errors=True)
