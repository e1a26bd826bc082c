"""A real one-node Slurm cluster for the tests, started from Debian's packages.

``slurm_cluster`` (session scope) installs ``slurmctld slurmd slurm-client munge`` with apt when
they are missing (the test machine runs as root), writes a ``slurm.conf`` sized from ``nproc`` and
``/proc/meminfo``, creates a munge key, and starts ``munged``, ``slurmctld`` and ``slurmd`` in the
foreground as child processes — with their own socket, ports, pid files and state directories
under a temporary directory, so nothing clashes with a system Slurm. At teardown it cancels the
jobs it submitted and stops exactly the processes it started, by pid.

It skips (with the reason) only when it cannot be root or apt cannot install the packages.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
BINARIES = ["slurmctld", "slurmd", "sbatch", "sinfo", "scontrol", "scancel", "munged"]


@dataclass
class SlurmCluster:
    root: Path
    conf: Path
    env: dict[str, str]
    partition: str = "kiban"
    processes: list[subprocess.Popen] = field(default_factory=list)
    jobs: list[str] = field(default_factory=list)
    nodes: dict[str, str] = field(default_factory=dict)  # node name -> address (multi-node cluster)

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(
            list(args), env=self.env, capture_output=True, text=True, check=check, timeout=60
        )

    def job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, Restarts, ...)."""
        out = self.run("scontrol", "show", "job", "-o", job_id, check=False).stdout  # empty once purged
        return dict(part.split("=", 1) for part in out.split() if "=" in part)

    def wait_for_job(
        self,
        job_id: str,
        *,
        states=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"),
        timeout: float = 180,
    ) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id} still {self.job(job_id).get('JobState')} after {timeout} s")


def _have_slurm() -> bool:
    return all(shutil.which(b) or Path(f"/usr/sbin/{b}").exists() for b in BINARIES)


def _install() -> str | None:
    """Install the packages; None on success, else why not."""
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    command = ["apt-get", "install", "-y", "--no-install-recommends", *PACKAGES]
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode != 0:  # package lists may be missing or stale
        subprocess.run(["apt-get", "update"], env=env, capture_output=True, text=True)
        result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        return f"apt-get install {' '.join(PACKAGES)} failed: {result.stderr.strip()[-500:]}"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _memory_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    raise RuntimeError("no MemTotal in /proc/meminfo")


def _write_conf(root: Path, host: str, munge_socket: Path) -> Path:
    cpus = os.cpu_count() or 1
    memory = max(512, _memory_mb() - 1024)  # leave the OS some room
    ctld_port, slurmd_port = _free_port(), _free_port()
    conf = root / "slurm.conf"
    conf.write_text(f"""\
ClusterName=kibantest
SlurmctldHost={host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
AuthType=auth/munge
CredType=cred/munge
# cred_expire also sets how long a requeued job waits before it may start again (default 120 s)
AuthInfo=socket={munge_socket},cred_expire=10
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
MpiDefault=none
JobRequeue=1
ReturnToService=2
KillWait=5
MinJobAge=600
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory} State=UNKNOWN
PartitionName=kiban Nodes={host} Default=YES MaxTime=INFINITE State=UP
""")
    return conf


def _start(cluster: SlurmCluster, *command: str, log: Path) -> None:
    handle = log.open("ab")
    cluster.processes.append(
        subprocess.Popen(list(command), env=cluster.env, stdout=handle, stderr=subprocess.STDOUT)
    )


def _stop_cluster(cluster: SlurmCluster) -> None:
    """Cancel the cluster's jobs, let slurmd end their processes (at most 30 s), then stop the
    daemons this fixture started, last started first.
    """
    for job in cluster.jobs:
        cluster.run("scancel", job, check=False)
    deadline = time.monotonic() + 30
    while (
        cluster.jobs
        and time.monotonic() < deadline
        and any(
            cluster.job(job).get("JobState") in ("RUNNING", "COMPLETING", "CONFIGURING")
            for job in cluster.jobs
        )
    ):
        time.sleep(0.5)
    for process in reversed(cluster.processes):
        _stop(process)


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=15)


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("a test Slurm needs root (to install packages and run slurmd as SlurmUser=root)")
    if not _have_slurm():
        problem = _install()
        if problem:
            pytest.skip(problem)
    root = tmp_path_factory.mktemp("slurm")
    for folder in ("state", "spool", "munge"):
        (root / folder).mkdir()
    host = subprocess.run(["hostname", "-s"], capture_output=True, text=True, check=True).stdout.strip()
    munge = _munge_folder(root)
    conf = _write_conf(root, host, munge / "munge.socket")
    env = {**os.environ, "SLURM_CONF": str(conf)}
    try:
        socket.gethostbyname(host)
    except OSError:  # Lightning takes the main address from SLURM_NODELIST unless MASTER_ADDR is set
        env["MASTER_ADDR"] = "127.0.0.1"
    cluster = SlurmCluster(root=root, conf=conf, env=env)
    try:
        _start_munged(cluster, munge)
        _start(
            cluster,
            shutil.which("slurmctld") or "/usr/sbin/slurmctld",
            "-D",
            "-c",
            "-f",
            str(conf),
            log=root / "slurmctld.out",
        )
        _start(
            cluster,
            shutil.which("slurmd") or "/usr/sbin/slurmd",
            "-D",
            "-f",
            str(conf),
            log=root / "slurmd.out",
        )
        _wait(
            lambda: cluster.run("sinfo", "-h", "-o", "%T", check=False).stdout.strip() == "idle",
            "the node to be idle in sinfo",
            cluster,
        )
        yield cluster
    finally:
        _stop_cluster(cluster)


def _munge_folder(root: Path) -> Path:
    """ROOT/munge (created beforehand) with a fresh key, both private as munged demands."""
    munge = root / "munge"
    key = munge / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    munge.chmod(0o700)
    return munge


def _start_munged(cluster: SlurmCluster, munge: Path) -> None:
    """Start munged on the key and socket in ``munge`` and wait for its socket."""
    _start(
        cluster,
        shutil.which("munged") or "/usr/sbin/munged",
        "--foreground",
        "--force",
        f"--key-file={munge / 'munge.key'}",
        f"--socket={munge / 'munge.socket'}",
        f"--pid-file={munge / 'munged.pid'}",
        f"--log-file={munge / 'munged.log'}",
        f"--seed-file={munge / 'munged.seed'}",
        log=cluster.root / "munged.out",
    )
    _wait(lambda: (munge / "munge.socket").exists(), "munged's socket", cluster)


def _wait(ready, what: str, cluster: SlurmCluster, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for process in cluster.processes:
            if process.poll() is not None:
                logs = "\n".join(p.read_text()[-2000:] for p in cluster.root.glob("*.out") if p.is_file())
                raise RuntimeError(
                    f"{process.args[0]} exited with {process.returncode} while waiting for {what}:\n{logs}"
                )
        if ready():
            return
        time.sleep(0.3)
    raise TimeoutError(f"timed out waiting for {what}; see the logs in {cluster.root}")


# ----------------------------------------------------------------------------------------------
# A multi-node cluster on one machine: each slurmd a node in its own network namespace.


MULTINODE_CPUS = 4  # job slots per node of the multi-node cluster


@dataclass
class Namespaces:
    """The network namespaces, veth pairs and bridge one fixture created (and only those)."""

    bridge: str
    namespaces: list[str] = field(default_factory=list)
    links: list[str] = field(default_factory=list)

    def remove(self) -> None:
        for namespace in self.namespaces:  # deleting a namespace deletes the veth ends inside it
            subprocess.run(["ip", "netns", "delete", namespace], capture_output=True)
        for link in [*self.links, self.bridge]:
            if subprocess.run(["ip", "link", "show", link], capture_output=True).returncode == 0:
                subprocess.run(["ip", "link", "delete", link], capture_output=True)


def _ip(*args: str) -> None:
    result = subprocess.run(["ip", *args], capture_output=True, text=True)
    if result.returncode != 0:
        raise OSError(f"ip {' '.join(args)}: {result.stderr.strip()}")


def _free_subnet() -> str:
    """A 10.213.N.0/24 that no interface or route here uses: ``10.213.N``."""
    used = subprocess.run(["ip", "-4", "addr"], capture_output=True, text=True).stdout
    used += subprocess.run(["ip", "-4", "route"], capture_output=True, text=True).stdout
    for n in random.sample(range(1, 255), 254):
        if f"10.213.{n}." not in used:
            return f"10.213.{n}"
    raise OSError("no free 10.213.N.0/24 subnet")


def _make_network(tag: str, subnet: str, nodes: int) -> Namespaces:
    """A bridge (the controller's side, ``subnet.1``) and one namespace per node (``subnet.1<i>``),
    joined by veth pairs. Traffic stays between the namespaces and the bridge: no route out, no NAT.
    """
    made = Namespaces(bridge=f"kbr{tag}")
    try:
        _ip("link", "add", made.bridge, "type", "bridge")
        made.links.append(made.bridge)
        _ip("addr", "add", f"{subnet}.1/24", "dev", made.bridge)
        _ip("link", "set", made.bridge, "up")
        for i in range(1, nodes + 1):
            namespace, host_end, node_end = f"kiban-{tag}-n{i}", f"kv{tag}{i}h", f"kv{tag}{i}n"
            _ip("netns", "add", namespace)
            made.namespaces.append(namespace)
            _ip("link", "add", host_end, "type", "veth", "peer", "name", node_end)
            made.links.append(host_end)
            _ip("link", "set", node_end, "netns", namespace)
            _ip("link", "set", host_end, "master", made.bridge)
            _ip("link", "set", host_end, "up")
            inside = ("netns", "exec", namespace, "ip")
            _ip(*inside, "link", "set", "lo", "up")
            _ip(*inside, "addr", "add", f"{subnet}.1{i}/24", "dev", node_end)
            _ip(*inside, "link", "set", node_end, "up")
    except OSError:
        made.remove()
        raise
    return made


def _write_multinode_conf(root: Path, host: str, subnet: str, nodes: list[str], munge_socket: Path) -> Path:
    # Every node is this machine: each offers MULTINODE_CPUS slots (config_overrides: slurmd takes
    # the configured count, not the cores it sees), so the tests' four one-CPU-per-node jobs run at once
    conf = root / "slurm.conf"
    lines = [
        f"NodeName={name} NodeAddr={subnet}.1{i} CPUs={MULTINODE_CPUS} RealMemory=2048 State=UNKNOWN"
        for i, name in enumerate(nodes, start=1)
    ]
    conf.write_text(f"""\
ClusterName=kibanmulti
SlurmctldHost={host}({subnet}.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge_socket},cred_expire=10
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool-%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
MpiDefault=none
JobRequeue=1
ReturnToService=2
KillWait=5
MinJobAge=600
SlurmdParameters=config_overrides
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
{chr(10).join(lines)}
PartitionName=kiban Nodes={",".join(nodes)} Default=YES MaxTime=INFINITE State=UP
""")
    return conf


@pytest.fixture(scope="module")
def slurm_multinode(tmp_path_factory):
    """A Slurm cluster: slurmctld + munged here, two slurmd each in its own network namespace (its own
    address, hostname and /etc/hosts, which names the nodes), joined by a bridge. A job on both
    nodes talks over those addresses as on a real cluster: srun to slurmctld, gloo rank to rank.
    """
    nodes = ["kbn1", "kbn2"]
    if os.geteuid() != 0:
        pytest.skip("a multi-node test Slurm needs root (network namespaces, slurmd as root)")
    if not all(shutil.which(tool) for tool in ("ip", "nsenter", "unshare")):
        pytest.skip("needs ip (iproute2), nsenter and unshare (util-linux) to make network namespaces")
    if not _have_slurm():
        problem = _install()
        if problem:
            pytest.skip(problem)
    tag = os.urandom(2).hex()
    subnet = _free_subnet()
    try:
        network = _make_network(tag, subnet, len(nodes))
    except OSError as error:
        pytest.skip(f"cannot make network namespaces here: {error}")
    root = tmp_path_factory.mktemp("slurm-multi")
    cluster = None
    try:
        for folder in ("state", "munge"):
            (root / folder).mkdir()
        host = subprocess.run(["hostname", "-s"], capture_output=True, text=True, check=True).stdout.strip()
        munge = _munge_folder(root)
        conf = _write_multinode_conf(root, host, subnet, nodes, munge / "munge.socket")
        hosts = root / "hosts"
        hosts.write_text(
            "127.0.0.1 localhost\n"
            + f"{subnet}.1 {host}\n"
            + "".join(f"{subnet}.1{i} {name}\n" for i, name in enumerate(nodes, start=1))
        )
        # the nodes' jobs find each other by name (Lightning's main address is the first node's)
        env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT")}
        env["SLURM_CONF"] = str(conf)
        cluster = SlurmCluster(root=root, conf=conf, env=env)
        _start_munged(cluster, munge)
        _start(cluster, shutil.which("slurmctld") or "/usr/sbin/slurmctld", "-D", "-c", "-f", str(conf), log=root / "slurmctld.out")
        slurmd = shutil.which("slurmd") or "/usr/sbin/slurmd"
        for i, name in enumerate(nodes, start=1):
            # nsenter (the node's network) -> unshare (own hostname, private mounts: the nodes'
            # hosts file stays inside) -> sh -> slurmd: each execs the next, so the pid Popen holds
            # is slurmd's. Not `ip netns exec`: it remounts /sys, and slurmd needs its cgroup tree.
            (root / f"spool-{name}").mkdir()
            _start(
                cluster,
                "nsenter", f"--net=/run/netns/{network.namespaces[i - 1]}",
                "unshare", "--uts", "--mount",
                "sh", "-c", f'mount --bind "$0" /etc/hosts && hostname {name} && exec "$1" -D -f "$2"',
                str(hosts), slurmd, str(conf),
                log=root / f"slurmd-{name}.out",
            )  # fmt: skip
        _wait(
            lambda: cluster.run("sinfo", "-h", "-N", "-o", "%T", check=False).stdout.split() == ["idle"] * len(nodes),
            "both nodes to be idle in sinfo",
            cluster,
            timeout=90,
        )
        cluster.nodes = {name: f"{subnet}.1{i}" for i, name in enumerate(nodes, start=1)}
        yield cluster
    finally:
        if cluster is not None:
            _stop_cluster(cluster)
        network.remove()
