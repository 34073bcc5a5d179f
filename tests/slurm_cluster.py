"""A private one-node slurm cluster for tests (`slurm_cluster` fixture, session scope).

Everything it starts is its own: a munged on a private socket, slurmctld and slurmd on free ports, with state,
spool, logs and pid files in one temp dir. Nothing system-wide is used or changed (no /etc/slurm, no
/run/munge), so it coexists with a real slurm or munge on the machine. Daemons run in the foreground as
children of the test process and are stopped by pid on teardown, after every job of the cluster is cancelled;
they also get SIGTERM if the test process dies, and a watchdog process then kills what is left of their jobs.

Clients see the cluster through SLURM_CONF in `cluster.env`. There is no accounting daemon (no sacct): job
states come from `scontrol show job -o`; `job()` records every change it sees in `history` (a finished job's
record is dropped MinJobAge seconds after it ends, and a requeued job passes through states quickly).

Needs root (slurmd) and the Debian packages slurmctld, slurmd, slurm-client and munge; skips otherwise.
"""

from __future__ import annotations

import os
import pwd
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from sf.distributed import free_port

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "srun", "scontrol", "squeue", "scancel", "sinfo")
MUNGE_KEY = Path("/etc/munge/munge.key")
# Final job states (not COMPLETING, REQUEUED or PREEMPTED: a requeued job goes on from those).
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
# Variables of an enclosing job or launcher that would leak into the jobs of this cluster.
LEAKY = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def missing_requirements() -> str:
    """Why this machine cannot run the private cluster ("" when it can)."""
    absent = [name for name in DAEMONS + CLIENTS if shutil.which(name) is None]
    if absent:
        return (f"slurm/munge not installed ({', '.join(absent)} missing): "
                f"apt-get install slurmctld slurmd slurm-client munge (.ci/run does this as root)")
    if os.geteuid() != 0:
        return "slurmd of the private test cluster must run as root"
    if not MUNGE_KEY.exists():
        return f"no munge key at {MUNGE_KEY} (the munge package creates it)"
    try:
        pwd.getpwnam("munge")
    except KeyError:
        return "no 'munge' user to run munged as"
    host = socket.gethostname().split(".")[0]
    try:
        socket.gethostbyname(host)
    except OSError:
        return f"host name {host!r} does not resolve (jobs rendezvous on it)"
    return ""


def _die_with_parent() -> None:
    """In a daemon's child process before exec: SIGTERM it when the test process dies (even by SIGKILL)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001  (best effort: teardown stops the daemons in the normal case)
        pass


def kill_processes_of(conf: Path) -> None:
    """SIGKILL every process of the cluster `conf` (daemons and jobs carry SLURM_CONF=conf), except ours."""
    spared = {os.getpid()} | {p.pid for p in psutil.Process().parents()}
    entry = f"SLURM_CONF={conf}".encode()
    victims = []
    for p in psutil.process_iter():
        try:
            # the raw block: slurmstepd's process title overwrites its start (psutil.environ() then reads nothing)
            if p.pid not in spared and entry in Path(f"/proc/{p.pid}/environ").read_bytes().split(b"\0"):
                victims.append(p)
        except (psutil.Error, OSError):
            pass
    for p in victims:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(victims, timeout=10)


def _reap_if_abandoned(owner_pid: int, root: Path) -> None:
    """Watchdog (`python slurm_cluster.py --reap PID ROOT`): when the test process dies without tearing its
    cluster down (SIGKILL, a crash), kill what is left of the cluster and its jobs and remove its dir."""
    try:
        owner = psutil.Process(owner_pid)
        while owner.is_running() and root.exists():
            time.sleep(1)
    except psutil.NoSuchProcess:
        pass
    if root.exists():
        kill_processes_of(root / "slurm.conf")
        shutil.rmtree(root, ignore_errors=True)



def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def _first_job_id(span: int = 32) -> int:
    """A first job id whose jobs' rendezvous ports (20000 + id % 20000, train.sbatch and sf.distributed) are
    free now: a cluster of another test session numbers its jobs from 1 too, and runs them on the same ports."""
    rng = random.Random(os.getpid() ^ time.time_ns())
    for _ in range(100):
        first = rng.randrange(1, 20000 - span)
        if all(_port_free(20000 + first + i) for i in range(span)):
            return first
    return rng.randrange(1, 20000 - span)


def parse_job(line: str) -> dict[str, str]:
    """`scontrol show job -o` output (one job, one line) as a dict; values may contain spaces."""
    fields: dict[str, str] = {}
    key = None
    for token in line.strip().split(" "):
        name, eq, value = token.partition("=")
        if eq and name and (name[0].isupper() or name[0].isdigit()) and " " not in name:
            key = name
            fields[key] = value
        elif key is not None:
            fields[key] += " " + token
    return fields


class SlurmCluster:
    """A running private cluster: `env` for its clients, and helpers to submit, watch, requeue jobs."""

    def __init__(self, root: Path, node: str, cpus: int):
        self.root, self.node, self.cpus = root, node, cpus
        self.conf = root / "slurm.conf"
        self.munge_socket = root / "munge" / "munge.socket"
        self.procs: dict[str, subprocess.Popen] = {}
        self.history: dict[str, list[dict]] = {}  # job id -> the (JobState, Restarts) changes job() has seen
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_")) and k not in LEAKY}
        env["SLURM_CONF"] = str(self.conf)
        self.env = env

    # -- start / stop --------------------------------------------------------------------------------------
    def write_config(self) -> None:
        r = self.root
        for sub in ("state", "spool", "log"):
            (r / sub).mkdir()
        (r / "plugstack.conf").write_text("")
        lines = [
            f"ClusterName=sftest{os.getpid()}",
            f"FirstJobId={_first_job_id()}",
            f"SlurmctldHost={self.node}",
            f"SlurmctldPort={free_port()}",
            f"SlurmdPort={free_port()}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            # private munged; cred_expire is also how long a requeued job waits before it may start again (120 s)
            f"AuthInfo=socket={self.munge_socket},cred_expire=10",
            f"StateSaveLocation={r / 'state'}",
            f"SlurmdSpoolDir={r / 'spool'}",
            f"SlurmctldPidFile={r / 'slurmctld.pid'}",
            f"SlurmdPidFile={r / 'slurmd.pid'}",
            f"SlurmctldLogFile={r / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={r / 'log' / 'slurmd.log'}",
            f"PlugStackConfig={r / 'plugstack.conf'}",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "SchedulerType=sched/builtin",
            "SchedulerParameters=sched_interval=1",  # a requeued job starts ~1 s after its begin time, not 60
            "MpiDefault=none",
            "SwitchType=switch/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "MailProg=/bin/true",
            "JobRequeue=1",  # `scontrol requeue` and `sbatch --requeue`
            "ReturnToService=2",
            "KillWait=10",  # SIGTERM -> SIGKILL: time for the trainer's preemption checkpoint
            "MinJobAge=60",
            "InactiveLimit=0",
            "SlurmdTimeout=300",
            "SlurmdParameters=config_overrides",  # trust the node line below, whatever the hardware says
            f"NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} Sockets=1 CoresPerSocket={self.cpus} "
            f"ThreadsPerCore=1 State=UNKNOWN",
            f"PartitionName=test Nodes={self.node} Default=YES MaxTime=INFINITE State=UP",
        ]
        self.conf.write_text("\n".join(lines) + "\n")

    def _spawn(self, name: str, cmd: list[str], **kw) -> None:
        log = open(self.root / "log" / f"{name}.stdout", "wb")
        try:
            self.procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                                env=self.env, start_new_session=True,
                                                preexec_fn=_die_with_parent, **kw)
        finally:
            log.close()

    def start(self) -> None:
        self.write_config()
        munge_dir = self.munge_socket.parent
        munge_dir.mkdir()
        munge_dir.chmod(0o755)  # munged: the socket dir must be traversable by all (clients run as anyone)
        os.chown(munge_dir, pwd.getpwnam("munge").pw_uid, pwd.getpwnam("munge").pw_gid)
        self._spawn("munged", ["munged", "--foreground", f"--socket={self.munge_socket}",
                               f"--key-file={MUNGE_KEY}", f"--pid-file={munge_dir / 'munged.pid'}",
                               f"--log-file={munge_dir / 'munged.log'}", f"--seed-file={munge_dir / 'munged.seed'}"],
                    user="munge", group="munge")
        self._until(lambda: self.munge_socket.exists(), 20, "munged to open its socket", "munged")
        self._spawn("slurmctld", ["slurmctld", "-D", "-c", "-f", str(self.conf)])
        self._until(lambda: self.client("scontrol", "ping", check=False).returncode == 0, 30,
                    "slurmctld to answer", "slurmctld")
        self._spawn("slurmd", ["slurmd", "-D", "-c", "-f", str(self.conf), "-N", self.node])
        self._until(lambda: self.node_state() == "idle", 60, "the node to be idle", "slurmd")

    def _until(self, ready, timeout: float, what: str, daemon: str) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            proc = self.procs[daemon]
            if proc.poll() is not None:
                raise RuntimeError(f"{daemon} exited ({proc.returncode}) while waiting for {what}\n{self.logs()}")
            if ready():
                return
            time.sleep(0.2)
        raise RuntimeError(f"timed out after {timeout}s waiting for {what}\n{self.logs()}")

    def node_state(self) -> str:
        out = self.client("sinfo", "-h", "-N", "-o", "%T", check=False)
        return out.stdout.strip() if out.returncode == 0 else ""

    def stop(self) -> None:
        """Cancel every job, then stop the daemons (by pid) and anything left of their jobs; never raises."""
        if self.procs.get("slurmctld") and self.procs["slurmctld"].poll() is None:
            try:
                ids = self.client("squeue", "-h", "-o", "%A", check=False).stdout.split()
                if ids:
                    self.client("scancel", *ids, check=False)
                deadline = time.time() + 30
                while time.time() < deadline and self.client("squeue", "-h", "-o", "%A", check=False).stdout.strip():
                    time.sleep(0.5)
            except Exception:  # noqa: BLE001  (teardown goes on whatever happened)
                pass
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self.procs.get(name)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=15)
        kill_processes_of(self.conf)

    def logs(self, lines: int = 30) -> str:
        """The tail of every daemon log, for failure messages."""
        out = []
        for path in sorted((self.root / "log").glob("*")) + [self.munge_socket.parent / "munged.log"]:
            if path.exists():
                tail = path.read_text(errors="replace").splitlines()[-lines:]
                out.append(f"--- {path.name}\n" + "\n".join(tail))
        return "\n".join(out)

    # -- clients -------------------------------------------------------------------------------------------
    def client(self, *args: str, check: bool = True, timeout: float = 30, cwd=None,
               env: dict | None = None) -> subprocess.CompletedProcess:
        result = subprocess.run(list(args), env={**self.env, **(env or {})}, cwd=cwd, capture_output=True,
                                text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed ({result.returncode}): {result.stdout}{result.stderr}")
        return result

    def sbatch(self, args: list[str], cwd, env: dict | None = None) -> str:
        """Submit; returns the job id."""
        out = self.client("sbatch", "--parsable", *map(str, args), cwd=cwd, env=env)
        return out.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str] | None:
        """The job's fields from `scontrol show job -o`, or None once slurmctld has forgotten it."""
        out = self.client("scontrol", "show", "job", "-o", str(job_id), check=False)
        if out.returncode != 0 or not out.stdout.strip():
            return None
        info = parse_job(out.stdout.splitlines()[0])
        self._record(job_id, info)
        return info

    def _record(self, job_id: str, info: dict) -> None:
        seen = self.history.setdefault(str(job_id), [])
        entry = {"JobState": info.get("JobState", ""), "Restarts": int(info.get("Restarts", "0") or 0)}
        if not seen or seen[-1] != entry:
            seen.append(entry)

    def wait(self, job_id: str, timeout: float, until=None, poll: float = 0.5) -> dict[str, str]:
        """Poll the job until it is in a terminal state (or `until(fields)` holds); return its last fields."""
        deadline = time.time() + timeout
        last: dict[str, str] | None = None
        while time.time() < deadline:
            info = self.job(job_id)
            if info is None:
                if last is not None:
                    return last  # purged after MinJobAge: its last recorded state is final
            else:
                last = info
                done = until(info) if until is not None else info.get("JobState") in TERMINAL
                if done:
                    return info
            time.sleep(poll)
        raise TimeoutError(f"job {job_id} not done after {timeout}s: last seen {last}\n{self.logs()}")

    def requeue(self, job_id: str) -> None:
        """Kill the running job (SIGTERM, SIGKILL after KillWait) and queue it again under the same id."""
        self.client("scontrol", "requeue", str(job_id))

    def signal(self, job_id: str, name: str) -> None:
        """Send a signal to the job's steps (not its batch script), like `--signal=USR1@120` near the time limit."""
        self.client("scancel", f"--signal={name}", str(job_id))


@pytest.fixture(scope="session")
def slurm_cluster():
    why = missing_requirements()
    if why:
        pytest.skip(why)
    root = Path(tempfile.mkdtemp(prefix="sf-slurm-"))
    root.chmod(0o755)  # munged runs as its own user and must reach its socket dir
    cluster = SlurmCluster(root, socket.gethostname().split(".")[0], len(os.sched_getaffinity(0)))  # = nproc
    reaper = subprocess.Popen([sys.executable, __file__, "--reap", str(os.getpid()), str(root)],
                              start_new_session=True, stdin=subprocess.DEVNULL)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)
        reaper.terminate()
        reaper.wait(timeout=30)


if __name__ == "__main__" and sys.argv[1:2] == ["--reap"]:
    _reap_if_abandoned(int(sys.argv[2]), Path(sys.argv[3]))
