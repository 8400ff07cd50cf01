"""The launcher table: every row read with the variables that launcher really sets, for rank 0 and a
later rank; bad environments named; and `dscluster env` through the real CLI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from dscluster.cluster.rendezvous import RendezvousError, discover, expand_first_host

from cli_in_process import run_dscluster  # tests/cli_in_process.py

FIELDS = ("rank", "local_rank", "world_size", "local_world_size", "master_addr", "master_port", "launcher",
          "node_rank")

# (case, environment as the launcher sets it, --nproc, expected fields)
ROWS = [
    ("torchrun rank 0", dict(TORCHELASTIC_RUN_ID="r", RANK="0", LOCAL_RANK="0", WORLD_SIZE="4", LOCAL_WORLD_SIZE="2",
                             GROUP_RANK="0", MASTER_ADDR="node-a", MASTER_PORT="29400"), None,
     (0, 0, 4, 2, "node-a", 29400, "torchrun", 0)),
    ("torchrun rank 3", dict(TORCHELASTIC_RUN_ID="r", RANK="3", LOCAL_RANK="1", WORLD_SIZE="4", LOCAL_WORLD_SIZE="2",
                             GROUP_RANK="1", MASTER_ADDR="node-a", MASTER_PORT="29400"), None,
     (3, 1, 4, 2, "node-a", 29400, "torchrun", 1)),
    ("openmpi rank 0", dict(OMPI_COMM_WORLD_RANK="0", OMPI_COMM_WORLD_SIZE="4", OMPI_COMM_WORLD_LOCAL_RANK="0",
                            OMPI_COMM_WORLD_LOCAL_SIZE="2", OMPI_COMM_WORLD_NODE_RANK="0",
                            MASTER_ADDR="job-worker-0.job-worker"), None,
     (0, 0, 4, 2, "job-worker-0.job-worker", 29500, "openmpi", 0)),
    ("openmpi rank 3", dict(OMPI_COMM_WORLD_RANK="3", OMPI_COMM_WORLD_SIZE="4", OMPI_COMM_WORLD_LOCAL_RANK="1",
                            OMPI_COMM_WORLD_LOCAL_SIZE="2", OMPI_COMM_WORLD_NODE_RANK="1",
                            MASTER_ADDR="job-worker-0.job-worker", MASTER_PORT="23456"),
     None, (3, 1, 4, 2, "job-worker-0.job-worker", 23456, "openmpi", 1)),
    # MPICH's Hydra: PMI_* for the world, MPI_LOCAL* for the node.
    ("mpich rank 0", dict(PMI_RANK="0", PMI_SIZE="4", MPI_LOCALRANKID="0", MPI_LOCALNRANKS="2", MASTER_ADDR="h0"),
     None, (0, 0, 4, 2, "h0", 29500, "mpich", 0)),
    ("mpich rank 3", dict(PMI_RANK="3", PMI_SIZE="4", MPI_LOCALRANKID="1", MPI_LOCALNRANKS="2", MASTER_ADDR="h0",
                          MASTER_PORT="29777"),
     None, (3, 1, 4, 2, "h0", 29777, "mpich", 1)),
    ("deepspeed rank 0", dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="2", LOCAL_SIZE="2", CROSS_RANK="0",
                              CROSS_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="29501"), None,
     (0, 0, 2, 2, "127.0.0.1", 29501, "deepspeed", 0)),
    ("deepspeed rank 1", dict(RANK="1", LOCAL_RANK="1", WORLD_SIZE="2", LOCAL_SIZE="2", CROSS_RANK="0",
                              CROSS_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="29501"), None,
     (1, 1, 2, 2, "127.0.0.1", 29501, "deepspeed", 0)),
    # Trainer torch runtimes describe nodes: node 1 of 3 with 2 processes each is ranks 2 and 3.
    ("trainer node 0", dict(PET_NNODES="3", PET_NPROC_PER_NODE="2", PET_NODE_RANK="0",
                            PET_MASTER_ADDR="job-node-0-0.job", PET_MASTER_PORT="29400"), None,
     (0, 0, 6, 2, "job-node-0-0.job", 29400, "trainer-torch", 0)),
    ("trainer node 1", dict(PET_NNODES="3", PET_NPROC_PER_NODE="2", PET_NODE_RANK="1",
                            PET_MASTER_ADDR="job-node-0-0.job", PET_MASTER_PORT="29400"), None,
     (2, 0, 6, 2, "job-node-0-0.job", 29400, "trainer-torch", 1)),
    # PET_NPROC_PER_NODE wins over --nproc; without it --nproc says how many ranks the node runs.
    ("trainer node 2, --nproc ignored", dict(PET_NNODES="3", PET_NPROC_PER_NODE="1", PET_NODE_RANK="2",
                                             PET_MASTER_ADDR="m", PET_MASTER_PORT="29400"), 4,
     (2, 0, 3, 1, "m", 29400, "trainer-torch", 2)),
    ("trainer node 1, --nproc 4", dict(PET_NNODES="2", PET_NODE_RANK="1", PET_MASTER_ADDR="m",
                                       PET_MASTER_PORT="29400"), 4,
     (4, 0, 8, 4, "m", 29400, "trainer-torch", 1)),
    # LeaderWorkerSet: one pod per node; --nproc says how many ranks each pod runs.
    ("lws leader", dict(LWS_LEADER_ADDRESS="srv-0.srv.default", LWS_GROUP_SIZE="2", LWS_WORKER_INDEX="0"), 2,
     (0, 0, 4, 2, "srv-0.srv.default", 29500, "lws", 0)),
    ("lws worker", dict(LWS_LEADER_ADDRESS="srv-0.srv.default", LWS_GROUP_SIZE="2", LWS_WORKER_INDEX="1",
                        MASTER_PORT="29511"), 2, (2, 0, 4, 2, "srv-0.srv.default", 29511, "lws", 1)),
    ("lws worker, one rank per pod", dict(LWS_LEADER_ADDRESS="srv-0.srv.default", LWS_GROUP_SIZE="3",
                                          LWS_WORKER_INDEX="2"), None,
     (2, 0, 3, 1, "srv-0.srv.default", 29500, "lws", 2)),
    ("slurm rank 0", dict(SLURM_PROCID="0", SLURM_NTASKS="6", SLURM_LOCALID="0", SLURM_NODEID="0",
                          SLURM_TASKS_PER_NODE="2(x3)", SLURM_STEP_NODELIST="gpu[03-05]"), None,
     (0, 0, 6, 2, "gpu03", 29500, "slurm", 0)),
    ("slurm rank 5", dict(SLURM_PROCID="5", SLURM_NTASKS="6", SLURM_LOCALID="1", SLURM_NODEID="2",
                          SLURM_NTASKS_PER_NODE="2", SLURM_STEP_NODELIST="gpu[03-05]"), None,
     (5, 1, 6, 2, "gpu03", 29500, "slurm", 2)),
    # Nodes of different sizes: 2+2+2+1 tasks on node03, node04, node05, node07.
    ("slurm uneven rank 1", dict(SLURM_PROCID="1", SLURM_NTASKS="7", SLURM_LOCALID="1", SLURM_NODEID="0",
                                 SLURM_TASKS_PER_NODE="2(x3),1", SLURM_STEP_NODELIST="node[03-05,07]"), None,
     (1, 1, 7, 2, "node03", 29500, "slurm", 0)),
    ("slurm uneven rank 6", dict(SLURM_PROCID="6", SLURM_NTASKS="7", SLURM_LOCALID="0", SLURM_NODEID="3",
                                 SLURM_TASKS_PER_NODE="2(x3),1", SLURM_STEP_NODELIST="node[03-05,07]",
                                 MASTER_PORT="12345"), None,
     (6, 0, 7, 1, "node03", 12345, "slurm", 3)),
    ("slurm with MASTER_ADDR", dict(SLURM_PROCID="1", SLURM_NTASKS="2", SLURM_LOCALID="0", SLURM_NODEID="1",
                                    SLURM_TASKS_PER_NODE="1(x2)", SLURM_JOB_NODELIST="a[1-2]",
                                    MASTER_ADDR="10.1.2.3"), None,
     (1, 0, 2, 1, "10.1.2.3", 29500, "slurm", 1)),
    ("plain env rank 0", dict(RANK="0", WORLD_SIZE="4", LOCAL_RANK="0", LOCAL_WORLD_SIZE="2", MASTER_ADDR="10.0.0.1",
                              MASTER_PORT="1234"), None, (0, 0, 4, 2, "10.0.0.1", 1234, "env", 0)),
    ("plain env rank 1", dict(RANK="1", WORLD_SIZE="2", MASTER_ADDR="10.0.0.1", MASTER_PORT="1234"), None,
     (1, 1, 2, 2, "10.0.0.1", 1234, "env", 0)),
    ("plain env with DeepSpeed's LOCAL_SIZE", dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="2", LOCAL_SIZE="2",
                                                   MASTER_ADDR="10.0.0.1"), None,
     (0, 0, 2, 2, "10.0.0.1", 29500, "env", 0)),
    ("the local launcher's rank 1", dict(DSCLUSTER_LAUNCHER="local", RANK="1", LOCAL_RANK="1", WORLD_SIZE="2",
                                         LOCAL_WORLD_SIZE="2", LOCAL_SIZE="2", MASTER_ADDR="127.0.0.1",
                                         MASTER_PORT="40000"), None,
     (1, 1, 2, 2, "127.0.0.1", 40000, "local", 0)),
    ("no launcher", {}, None, (0, 0, 1, 1, "127.0.0.1", 29500, "none", 0)),
    ("no launcher, --nproc 2", {}, 2, (0, 0, 2, 2, "127.0.0.1", 29500, "none", 0)),
]


@pytest.mark.parametrize("case, env, nproc, expected", ROWS, ids=[r[0] for r in ROWS])
def test_launcher_rows(case, env, nproc, expected):
    rdzv = discover(env, nproc_per_node=nproc)
    assert tuple(getattr(rdzv, f) for f in FIELDS) == expected
    exported = rdzv.torch_env()
    assert exported["LOCAL_SIZE"] == exported["LOCAL_WORLD_SIZE"] == str(rdzv.local_world_size)
    assert exported["RANK"] == str(rdzv.rank) and exported["MASTER_PORT"] == str(rdzv.master_port)


def test_per_node_rows_ask_the_local_launcher_to_spawn():
    rdzv = discover(dict(LWS_LEADER_ADDRESS="l", LWS_GROUP_SIZE="2", LWS_WORKER_INDEX="1"), nproc_per_node=4)
    assert rdzv.spawn_local == 4 and rdzv.node_rank == 1 and rdzv.rank == 4
    assert discover(dict(RANK="0", WORLD_SIZE="1")).spawn_local == 1


def test_openmpi_master_from_the_hostfile(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# written by the MPI Operator\njob-worker-0.job-worker.ns.svc slots=8\njob-worker-1 slots=8\n")
    rdzv = discover(dict(OMPI_COMM_WORLD_RANK="9", OMPI_COMM_WORLD_SIZE="16", OMPI_COMM_WORLD_LOCAL_RANK="1",
                         OMPI_COMM_WORLD_LOCAL_SIZE="8", OMPI_MCA_orte_default_hostfile=str(hostfile)))
    assert rdzv.master_addr == "job-worker-0.job-worker.ns.svc" and rdzv.node_rank == 1


def test_an_explicit_master_addr_wins_over_the_hostfile(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("first-host slots=1\n")
    env = dict(OMPI_COMM_WORLD_RANK="1", OMPI_COMM_WORLD_SIZE="2", OMPI_COMM_WORLD_LOCAL_RANK="0",
               OMPI_COMM_WORLD_LOCAL_SIZE="1", OMPI_MCA_orte_default_hostfile=str(hostfile))
    assert discover(env).master_addr == "first-host"
    assert discover({**env, "MASTER_ADDR": "svc.ns"}).master_addr == "svc.ns"


# The forms (a suffix after the bracket, two bracket groups), and the examples of Slurm's
# documentation (hostlist expressions in slurm.conf, sbatch/srun and scontrol man pages).
NODELISTS = [("node[03-05,07]", "node03"), ("gpu[03-05,07]", "gpu03"), ("node1", "node1"), ("a[9],b[1-2]", "a9"),
             ("x,y[1-2]", "x"), ("tiny-node-[12-13]", "tiny-node-12"),
             ("node[1-2]-ib", "node1-ib"), ("rack[1-2]-n[1-4]", "rack1-n1"),
             ("tux[0-15],lx[10-20]", "tux0"), ("lx[10-20]", "lx10"), ("linux[0-64,128]", "linux0"),
             ("lx[10-20,25,27-29]", "lx10"), ("rack[0-63]_blade[0-41]", "rack0_blade0"),
             ("node[01-02],node[05-06]", "node01"), ("dev[009-011]", "dev009"), ("  snode[2-3] ", "snode2")]


@pytest.mark.parametrize("nodelist, first", NODELISTS)
def test_slurm_nodelist_first_host(nodelist, first):
    assert expand_first_host(nodelist) == first


def _slurm_conf(tmp_path) -> str:
    """A minimal slurm.conf: scontrol reads one before it does anything, even expand a list."""
    conf = tmp_path / "slurm.conf"
    conf.write_text("ClusterName=test\nSlurmctldHost=localhost\nNodeName=localhost\nPartitionName=p Nodes=localhost\n")
    return str(conf)


def _scontrol(tmp_path, nodelist: str) -> str | None:
    """Slurm's own expansion (`scontrol show hostnames`), with a minimal slurm.conf; None when
    scontrol is not installed or cannot parse the form (it says 'Invalid hostlist')."""
    if shutil.which("scontrol") is None:
        return None
    out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=30,
                         env={**os.environ, "SLURM_CONF": _slurm_conf(tmp_path)})
    if out.returncode != 0 or "Invalid" in out.stdout or out.stderr.strip():
        return None
    return out.stdout.split()[0]


@pytest.mark.skipif(shutil.which("scontrol") is None, reason="Slurm's scontrol (Debian slurm-client) not installed")
def test_slurm_nodelist_agrees_with_scontrol(tmp_path):
    """Slurm's own parser is the reference wherever it accepts the form."""
    compared = 0
    for nodelist, _ in NODELISTS:
        reference = _scontrol(tmp_path, nodelist.strip())
        if reference is not None:
            assert expand_first_host(nodelist) == reference, nodelist
            compared += 1
    assert compared >= 10


@pytest.mark.skipif(shutil.which("scontrol") is None, reason="Slurm's scontrol (Debian slurm-client) not installed")
def test_a_list_python_hostlist_rejects_is_given_to_scontrol(tmp_path, monkeypatch):
    """'n[1-]' is no list to python-hostlist but is one to Slurm (n1): on a Slurm node (a
    slurm.conf) the rendezvous asks `scontrol show hostnames` before it calls the list bad."""
    monkeypatch.setenv("SLURM_CONF", _slurm_conf(tmp_path))
    assert expand_first_host("n[1-]") == "n1"
    with pytest.raises(RendezvousError, match=r"SLURM_STEP_NODELIST='n\[3-1\]' is not a Slurm node list"):
        expand_first_host("n[3-1]")  # both reject it
    monkeypatch.setenv("PATH", str(tmp_path))  # no scontrol: the list is reported, named
    with pytest.raises(RendezvousError, match=r"SLURM_STEP_NODELIST='n\[1-\]' is not a Slurm node list"):
        expand_first_host("n[1-]")


def test_slurm_step_variables_win_over_the_job_variables():
    """`sbatch -N 2 -n 8` then `srun -N 2 -n 2 --ntasks-per-node 1` on the InfiniBand names: the step
    runs 2 tasks, one per node, on hosts the job's variables do not name."""
    job = dict(SLURM_NTASKS="8", SLURM_TASKS_PER_NODE="4(x2)", SLURM_NTASKS_PER_NODE="4",
               SLURM_JOB_NODELIST="node[1-2]", SLURM_JOB_NUM_NODES="2")
    step = dict(SLURM_STEP_NUM_TASKS="2", SLURM_STEP_TASKS_PER_NODE="1(x2)", SLURM_STEP_NODELIST="node[1-2]-ib",
                SLURM_STEP_NUM_NODES="2", SLURM_PROCID="1", SLURM_LOCALID="0", SLURM_NODEID="1")
    rdzv = discover({**job, **step})
    assert (rdzv.rank, rdzv.world_size, rdzv.local_world_size, rdzv.node_rank, rdzv.master_addr) == \
        (1, 2, 1, 1, "node1-ib")
    # Without the step's variables (an old Slurm, or the batch script itself) the job's are used.
    rdzv = discover({**job, "SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NODEID": "1"})
    assert (rdzv.world_size, rdzv.local_world_size, rdzv.master_addr) == (8, 4, "node1")


@pytest.mark.parametrize("node, local_size", [(0, 2), (1, 2), (2, 2), (3, 1)])
def test_slurm_tasks_per_node_list_picks_this_node(node, local_size):
    """SLURM_TASKS_PER_NODE='2(x3),1': nodes 0-2 run 2 tasks, node 3 runs 1 (ranks 6)."""
    rank = 2 * node
    env = dict(SLURM_PROCID=str(rank), SLURM_NTASKS="7", SLURM_LOCALID="0", SLURM_NODEID=str(node),
               SLURM_TASKS_PER_NODE="2(x3),1", SLURM_STEP_NODELIST="node[03-05,07]")
    rdzv = discover(env)
    assert (rdzv.rank, rdzv.local_world_size, rdzv.node_rank, rdzv.master_addr) == (rank, local_size, node, "node03")


def test_export_writes_every_variable_torch_and_deepspeed_read():
    environ: dict[str, str] = {}
    discover(dict(OMPI_COMM_WORLD_RANK="1", OMPI_COMM_WORLD_SIZE="2", OMPI_COMM_WORLD_LOCAL_RANK="1",
                  OMPI_COMM_WORLD_LOCAL_SIZE="2", MASTER_ADDR="m")).export(environ)
    assert environ == dict(RANK="1", LOCAL_RANK="1", WORLD_SIZE="2", LOCAL_WORLD_SIZE="2", LOCAL_SIZE="2",
                           MASTER_ADDR="m", MASTER_PORT="29500")


# (environment, text the message must contain: the variable and usually its value)
BAD = [
    (dict(OMPI_COMM_WORLD_RANK="0"), "OMPI_COMM_WORLD_SIZE is not set"),
    (dict(OMPI_COMM_WORLD_SIZE="2"), "OMPI_COMM_WORLD_RANK is not set"),
    (dict(PMI_RANK="1"), "PMI_SIZE is not set"),
    (dict(RANK="2", WORLD_SIZE="2", MASTER_ADDR="h"), "RANK=2 must be less than WORLD_SIZE=2"),
    (dict(RANK="-1", WORLD_SIZE="2", MASTER_ADDR="h"), "RANK=-1"),
    (dict(RANK="x", WORLD_SIZE="2", MASTER_ADDR="h"), "RANK='x' is not an integer"),
    (dict(RANK="0", WORLD_SIZE="two", MASTER_ADDR="h"), "WORLD_SIZE='two' is not an integer"),
    (dict(RANK="0", WORLD_SIZE="2", MASTER_ADDR="h", MASTER_PORT="70000"), "MASTER_PORT=70000"),
    (dict(RANK="0", WORLD_SIZE="2", MASTER_ADDR="h", MASTER_PORT="0"), "MASTER_PORT=0"),
    (dict(RANK="0", WORLD_SIZE="2", MASTER_ADDR="h", MASTER_PORT="http"), "MASTER_PORT='http'"),
    (dict(RANK="1", WORLD_SIZE="2"), "MASTER_ADDR is not set"),
    (dict(TORCHELASTIC_RUN_ID="r", RANK="1", WORLD_SIZE="4", LOCAL_RANK="2", LOCAL_WORLD_SIZE="2",
          MASTER_ADDR="h"), "LOCAL_RANK=2 must be less than LOCAL_WORLD_SIZE=2"),
    (dict(RANK="0", WORLD_SIZE="2", LOCAL_WORLD_SIZE="4", MASTER_ADDR="h"), "LOCAL_WORLD_SIZE=4 must not exceed"),
    (dict(OMPI_COMM_WORLD_RANK="1", OMPI_COMM_WORLD_SIZE="2", OMPI_COMM_WORLD_LOCAL_RANK="1",
          OMPI_COMM_WORLD_LOCAL_SIZE="1", MASTER_ADDR="h"), "OMPI_COMM_WORLD_LOCAL_RANK=1"),
    (dict(OMPI_COMM_WORLD_RANK="1", OMPI_COMM_WORLD_SIZE="2", RANK="0", MASTER_ADDR="h"),
     "RANK=0 contradicts OMPI_COMM_WORLD_RANK=1"),
    (dict(PMI_RANK="0", PMI_SIZE="0"), "PMI_SIZE=0"),
    (dict(LWS_LEADER_ADDRESS="l", LWS_GROUP_SIZE="2", LWS_WORKER_INDEX="5"), "LWS_WORKER_INDEX=5"),
    (dict(LWS_LEADER_ADDRESS="l", LWS_GROUP_SIZE="2", LWS_WORKER_INDEX="one"), "LWS_WORKER_INDEX='one'"),
    (dict(LWS_LEADER_ADDRESS="l", LWS_GROUP_SIZE="2", LWS_WORKER_INDEX="1", MASTER_PORT="99999"), "MASTER_PORT=99999"),
    (dict(PET_NNODES="2", PET_NODE_RANK="0", PET_NPROC_PER_NODE="many", PET_MASTER_ADDR="m"), "PET_NPROC_PER_NODE"),
    (dict(PET_NNODES="2", PET_NODE_RANK="1", PET_NPROC_PER_NODE="1"), "PET_MASTER_ADDR is not set"),
    (dict(PET_NNODES="2", PET_NODE_RANK="1", PET_NPROC_PER_NODE="1", PET_MASTER_ADDR="m", PET_MASTER_PORT="65536"),
     "PET_MASTER_PORT=65536"),
    (dict(SLURM_PROCID="0", SLURM_NTASKS="4", SLURM_TASKS_PER_NODE="2(x", SLURM_STEP_NODELIST="n[1-2]"),
     "SLURM_TASKS_PER_NODE"),
    (dict(SLURM_PROCID="0", SLURM_NTASKS="4", SLURM_LOCALID="0"), "SLURM_STEP_NODELIST"),
    (dict(SLURM_PROCID="0", SLURM_STEP_NUM_TASKS="2", SLURM_STEP_TASKS_PER_NODE="1(x", SLURM_STEP_NODELIST="n[1-2]"),
     "SLURM_STEP_TASKS_PER_NODE='1(x'"),
    (dict(SLURM_PROCID="2", SLURM_STEP_NUM_TASKS="2", SLURM_NTASKS="8", SLURM_STEP_NODELIST="n[1-2]"),
     "SLURM_PROCID=2 must be less than SLURM_STEP_NUM_TASKS=2"),
    (dict(SLURM_PROCID="0", SLURM_NTASKS="2", SLURM_STEP_NODELIST="n[1-"), "SLURM_STEP_NODELIST='n[1-'"),
    (dict(SLURM_PROCID="2", SLURM_NTASKS="4", SLURM_LOCALID="0", SLURM_NODEID="x", SLURM_STEP_NODELIST="n[1-2]",
          SLURM_NTASKS_PER_NODE="2"), "SLURM_NODEID='x'"),
]


@pytest.mark.parametrize("env, named", BAD, ids=[b[1] for b in BAD])
def test_bad_environment_names_the_variable(env, named):
    with pytest.raises(RendezvousError) as err:
        discover(env)
    assert named in str(err.value)


# -- through the command line ---------------------------------------------------------------------

LAUNCHER_PREFIXES = ("RANK", "WORLD_SIZE", "LOCAL_", "MASTER_", "OMPI_", "PMI_", "MPI_LOCAL", "SLURM_", "PET_",
                     "LWS_", "TORCHELASTIC", "CROSS_", "DSCLUSTER_", "GROUP_RANK", "PRTE_", "PMIX_")


def dscluster_env(*args: str, in_a_process: bool = False, **env: str):
    """`dscluster env` with exactly `env` as launcher variables: every launcher variable of this
    process's environment is removed first, so the outer environment cannot change the answer.
    Run in this process (the same parser and handler), or with in_a_process through
    `python -m dscluster`, the entry point itself."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(LAUNCHER_PREFIXES)}
    if in_a_process:
        return subprocess.run([sys.executable, "-m", "dscluster", "env", *args], capture_output=True, text=True,
                              timeout=60, env={**base, **env})
    return run_dscluster("env", *args, env={**base, **env})


@pytest.mark.parametrize("case, env, nproc, expected", [r for r in ROWS if r[0] in (
    "slurm uneven rank 6", "lws worker", "trainer node 1", "openmpi rank 3", "mpich rank 3", "no launcher")],
    ids=lambda v: v if isinstance(v, str) else "")
def test_env_prints_one_json_line(case, env, nproc, expected):
    proc = dscluster_env(*(["--nproc", str(nproc)] if nproc else []), in_a_process=case == "no launcher", **env)
    assert proc.returncode == 0, proc.stderr
    (line,) = proc.stdout.splitlines()
    got = json.loads(line)
    assert {k: got[k] for k in FIELDS} == dict(zip(FIELDS, expected))


@pytest.mark.parametrize("env, named", BAD, ids=[b[1] for b in BAD])
def test_env_bad_environment_exits_2_in_one_line(env, named):
    proc = dscluster_env(**env, in_a_process=named == BAD[0][1])
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stdout == ""
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("dscluster: error: ") and named in line
