"""The launcher table: every row read with the variables that launcher really sets, for rank 0 and a
later rank; bad environments named; and `dscluster env` through the real CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from dscluster.cluster.rendezvous import RendezvousError, discover, expand_first_host

FIELDS = ("rank", "local_rank", "world_size", "local_world_size", "master_addr", "master_port", "launcher")

# (case, environment as the launcher sets it, --nproc, expected fields)
ROWS = [
    ("torchrun rank 0", dict(TORCHELASTIC_RUN_ID="r", RANK="0", LOCAL_RANK="0", WORLD_SIZE="4", LOCAL_WORLD_SIZE="2",
                             MASTER_ADDR="node-a", MASTER_PORT="29400"), None,
     (0, 0, 4, 2, "node-a", 29400, "torchrun")),
    ("torchrun rank 3", dict(TORCHELASTIC_RUN_ID="r", RANK="3", LOCAL_RANK="1", WORLD_SIZE="4", LOCAL_WORLD_SIZE="2",
                             MASTER_ADDR="node-a", MASTER_PORT="29400"), None,
     (3, 1, 4, 2, "node-a", 29400, "torchrun")),
    ("openmpi rank 0", dict(OMPI_COMM_WORLD_RANK="0", OMPI_COMM_WORLD_SIZE="4", OMPI_COMM_WORLD_LOCAL_RANK="0",
                            OMPI_COMM_WORLD_LOCAL_SIZE="2", MASTER_ADDR="job-worker-0.job-worker"), None,
     (0, 0, 4, 2, "job-worker-0.job-worker", 29500, "openmpi")),
    ("openmpi rank 3", dict(OMPI_COMM_WORLD_RANK="3", OMPI_COMM_WORLD_SIZE="4", OMPI_COMM_WORLD_LOCAL_RANK="1",
                            OMPI_COMM_WORLD_LOCAL_SIZE="2", MASTER_ADDR="job-worker-0.job-worker", MASTER_PORT="23456"),
     None, (3, 1, 4, 2, "job-worker-0.job-worker", 23456, "openmpi")),
    ("mpich rank 0", dict(PMI_RANK="0", PMI_SIZE="2", MPI_LOCALRANKID="0", MPI_LOCALNRANKS="1", MASTER_ADDR="h0"),
     None, (0, 0, 2, 1, "h0", 29500, "mpich")),
    ("mpich rank 1", dict(PMI_RANK="1", PMI_SIZE="2", MPI_LOCALRANKID="0", MPI_LOCALNRANKS="1", MASTER_ADDR="h0"),
     None, (1, 0, 2, 1, "h0", 29500, "mpich")),
    ("deepspeed rank 0", dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="2", LOCAL_SIZE="2", CROSS_RANK="0",
                              CROSS_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="29501"), None,
     (0, 0, 2, 2, "127.0.0.1", 29501, "deepspeed")),
    ("deepspeed rank 1", dict(RANK="1", LOCAL_RANK="1", WORLD_SIZE="2", LOCAL_SIZE="2", CROSS_RANK="0",
                              CROSS_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="29501"), None,
     (1, 1, 2, 2, "127.0.0.1", 29501, "deepspeed")),
    # Trainer torch runtimes describe nodes: node 1 of 3 with 2 processes each is ranks 2 and 3.
    ("trainer node 0", dict(PET_NNODES="3", PET_NPROC_PER_NODE="2", PET_NODE_RANK="0",
                            PET_MASTER_ADDR="job-node-0-0.job", PET_MASTER_PORT="29400"), None,
     (0, 0, 6, 2, "job-node-0-0.job", 29400, "trainer-torch")),
    ("trainer node 1", dict(PET_NNODES="3", PET_NPROC_PER_NODE="2", PET_NODE_RANK="1",
                            PET_MASTER_ADDR="job-node-0-0.job", PET_MASTER_PORT="29400"), None,
     (2, 0, 6, 2, "job-node-0-0.job", 29400, "trainer-torch")),
    # LeaderWorkerSet: one pod per node; --nproc says how many ranks each pod runs.
    ("lws leader", dict(LWS_LEADER_ADDRESS="srv-0.srv.default", LWS_GROUP_SIZE="2", LWS_WORKER_INDEX="0"), 2,
     (0, 0, 4, 2, "srv-0.srv.default", 29500, "lws")),
    ("lws worker", dict(LWS_LEADER_ADDRESS="srv-0.srv.default", LWS_GROUP_SIZE="2", LWS_WORKER_INDEX="1",
                        MASTER_PORT="29511"), 2, (2, 0, 4, 2, "srv-0.srv.default", 29511, "lws")),
    ("slurm rank 0", dict(SLURM_PROCID="0", SLURM_NTASKS="6", SLURM_LOCALID="0", SLURM_NODEID="0",
                          SLURM_TASKS_PER_NODE="2(x3)", SLURM_STEP_NODELIST="gpu[03-05]"), None,
     (0, 0, 6, 2, "gpu03", 29500, "slurm")),
    ("slurm rank 5", dict(SLURM_PROCID="5", SLURM_NTASKS="6", SLURM_LOCALID="1", SLURM_NODEID="2",
                          SLURM_NTASKS_PER_NODE="2", SLURM_STEP_NODELIST="gpu[03-05]"), None,
     (5, 1, 6, 2, "gpu03", 29500, "slurm")),
    ("plain env", dict(RANK="1", WORLD_SIZE="2", MASTER_ADDR="10.0.0.1", MASTER_PORT="1234"), None,
     (1, 1, 2, 2, "10.0.0.1", 1234, "env")),
    ("no launcher", {}, None, (0, 0, 1, 1, "127.0.0.1", 29500, "none")),
    ("no launcher, --nproc 2", {}, 2, (0, 0, 2, 2, "127.0.0.1", 29500, "none")),
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


@pytest.mark.parametrize("nodelist, first", [("gpu[03-05,07]", "gpu03"), ("node1", "node1"),
                                             ("a[9],b[1-2]", "a9"), ("tiny-node-[12-13]", "tiny-node-12")])
def test_slurm_nodelist_first_host(nodelist, first):
    assert expand_first_host(nodelist) == first


def test_slurm_tasks_per_node_list_picks_this_node():
    env = dict(SLURM_PROCID="4", SLURM_NTASKS="5", SLURM_LOCALID="0", SLURM_NODEID="2",
               SLURM_TASKS_PER_NODE="2(x2),1", SLURM_STEP_NODELIST="n[1-3]")
    assert discover(env).local_world_size == 1


BAD = [
    (dict(OMPI_COMM_WORLD_RANK="0"), "OMPI_COMM_WORLD_SIZE"),
    (dict(OMPI_COMM_WORLD_SIZE="2"), "OMPI_COMM_WORLD_RANK"),
    (dict(RANK="2", WORLD_SIZE="2", MASTER_ADDR="h"), "RANK=2"),
    (dict(RANK="x", WORLD_SIZE="2", MASTER_ADDR="h"), "RANK='x'"),
    (dict(RANK="0", WORLD_SIZE="2", MASTER_ADDR="h", MASTER_PORT="70000"), "MASTER_PORT"),
    (dict(RANK="1", WORLD_SIZE="2"), "MASTER_ADDR"),
    (dict(TORCHELASTIC_RUN_ID="r", RANK="1", WORLD_SIZE="4", LOCAL_RANK="2", LOCAL_WORLD_SIZE="2",
          MASTER_ADDR="h"), "LOCAL_RANK=2"),
    (dict(OMPI_COMM_WORLD_RANK="1", OMPI_COMM_WORLD_SIZE="2", RANK="0", MASTER_ADDR="h"), "contradicts"),
    (dict(PMI_RANK="0", PMI_SIZE="0"), "PMI_SIZE"),
    (dict(LWS_LEADER_ADDRESS="l", LWS_GROUP_SIZE="2", LWS_WORKER_INDEX="5"), "LWS_WORKER_INDEX=5"),
    (dict(PET_NNODES="2", PET_NODE_RANK="0", PET_NPROC_PER_NODE="many", PET_MASTER_ADDR="m"), "PET_NPROC_PER_NODE"),
]


@pytest.mark.parametrize("env, named", BAD, ids=[b[1] for b in BAD])
def test_bad_environment_names_the_variable(env, named):
    with pytest.raises(RendezvousError, match=named.replace("(", r"\(").replace(")", r"\)")):
        discover(env)


# -- through the command line ---------------------------------------------------------------------

LAUNCHER_PREFIXES = ("RANK", "WORLD_SIZE", "LOCAL_", "MASTER_", "OMPI_", "PMI_", "MPI_LOCAL", "SLURM_", "PET_",
                     "LWS_", "TORCHELASTIC", "CROSS_", "DSCLUSTER_", "GROUP_RANK")


def dscluster_env(*args: str, **env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith(LAUNCHER_PREFIXES)}
    return subprocess.run([sys.executable, "-m", "dscluster", "env", *args], capture_output=True, text=True,
                          timeout=60, env={**base, **env})


def test_env_prints_one_json_line():
    proc = dscluster_env(SLURM_PROCID="1", SLURM_NTASKS="2", SLURM_LOCALID="1", SLURM_NTASKS_PER_NODE="2",
                         SLURM_STEP_NODELIST="gpu[07-08]")
    assert proc.returncode == 0, proc.stderr
    (line,) = proc.stdout.splitlines()
    got = json.loads(line)
    assert {k: got[k] for k in FIELDS} == dict(zip(FIELDS, (1, 1, 2, 2, "gpu07", 29500, "slurm")))


@pytest.mark.parametrize("env, named", [
    (dict(OMPI_COMM_WORLD_RANK="0"), "OMPI_COMM_WORLD_SIZE"),
    (dict(RANK="3", WORLD_SIZE="2", MASTER_ADDR="h"), "WORLD_SIZE"),
])
def test_env_bad_environment_exits_2_in_one_line(env, named):
    proc = dscluster_env(**env)
    assert proc.returncode == 2
    assert named in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
