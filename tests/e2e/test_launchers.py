"""Every real launcher starts 2 ranks that find each other and all-reduce over gloo, and the local
launcher supervises its ranks the way torchrun does.

Each launcher runs two rank programs: `dscluster env --check` (the product's own check) and
`rank_probe.py` (discover -> init_groups(gloo) -> all-reduce, reporting what the launcher set and
what was exported)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dscluster.cluster.launch import free_port
from dscluster.cluster.rendezvous import own_address

BIN = Path(sys.executable).parent
PROBE = str(Path(__file__).with_name("rank_probe.py"))
LAUNCHER_PREFIXES = ("RANK", "WORLD_SIZE", "LOCAL_", "MASTER_", "OMPI_", "PMI_", "MPI_LOCAL", "SLURM_", "PET_",
                     "LWS_", "TORCHELASTIC", "CROSS_", "DSCLUSTER_", "GROUP_RANK", "PRTE_", "PMIX_",
                     "OMP_NUM_THREADS")
CHECK = [sys.executable, "-m", "dscluster", "env", "--check", "--timeout", "60"]
PROGRAMS = {"env --check": CHECK, "probe": [sys.executable, PROBE]}
needs_mpirun = pytest.mark.skipif(shutil.which("mpirun") is None, reason="OpenMPI's mpirun is not installed")
each_program = pytest.mark.parametrize("program", PROGRAMS)


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without any launcher's variables, so the outer world cannot leak in."""
    return {**{k: v for k, v in os.environ.items() if not k.startswith(LAUNCHER_PREFIXES)}, **extra}


def run(cmd: list[str], env: dict[str, str] | None = None, timeout: float = 120) -> list[dict]:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env or clean_env())
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    # Ranks of mpirun and deepspeed share one stdout: two reports may land on one line.
    reports = [json.loads(m) for m in re.findall(r'\{[^{}]*"all_reduce"[^{}]*\}', proc.stdout)]
    assert len(reports) == 2, proc.stdout[-3000:]
    return sorted(reports, key=lambda r: r["rank"])


def assert_group(reports: list[dict], launcher: str) -> None:
    assert [r["rank"] for r in reports] == [0, 1]
    assert [r["local_rank"] for r in reports] == [0, 1]
    assert {r["world_size"] for r in reports} == {2} and {r["local_world_size"] for r in reports} == {2}
    assert all(r["launcher"] == launcher and r["all_reduce"] == 3 for r in reports)
    assert len({(r["master_addr"], r["master_port"]) for r in reports}) == 1
    for r in reports:
        if "exported_local_size" in r:  # the probe reports the environment after discover().export()
            assert r["exported_local_size"] == "2", r


@each_program
def test_local_launcher(program):
    reports = run([sys.executable, "-m", "dscluster", "launch", "--nproc", "2", "--", *PROGRAMS[program]])
    assert_group(reports, "local")
    if program == "probe":
        # No OMP_NUM_THREADS outside: rank_env splits the cores between the 2 local ranks.
        assert {r["omp_num_threads"] for r in reports} == {str(max(1, (os.cpu_count() or 1) // 2))}


@each_program
def test_torchrun(program):
    cmd = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port())]
    reports = run([*cmd, *PROGRAMS[program][1:]])
    assert_group(reports, "torchrun")
    if program == "probe":
        # torchrun sets LOCAL_WORLD_SIZE but not LOCAL_SIZE, which DeepSpeed's CPU all-reduce needs.
        assert {r["launcher_local_size"] for r in reports} == {None}


def test_deepspeed_launcher_script_with_local_rank_appended():
    """The way users run it: `deepspeed --num_gpus 2 script.py`; the launcher appends --local_rank=N."""
    cmd = [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()), PROBE]
    reports = run(cmd)
    assert_group(reports, "deepspeed")
    assert [r["argv_local_rank"] for r in reports] == [0, 1]
    assert {r["launcher_local_size"] for r in reports} == {"2"}


@pytest.mark.parametrize("local_rank_flag", [True, False], ids=["--local_rank appended", "--no_local_rank"])
def test_deepspeed_launcher_env_check(local_rank_flag):
    cmd = [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port())]
    if not local_rank_flag:
        cmd.append("--no_local_rank")
    assert_group(run([*cmd, "--module", "dscluster", "env", "--check"]), "deepspeed")


MPIRUN = ["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", "2"]


@needs_mpirun
@each_program
def test_mpirun_with_master_addr_given(program):
    cmd = [*MPIRUN, "-x", "MASTER_ADDR=127.0.0.1", "-x", f"MASTER_PORT={free_port()}", *PROGRAMS[program]]
    reports = run(cmd)
    assert_group(reports, "openmpi")
    assert reports[0]["master_addr"] == "127.0.0.1"


@needs_mpirun
@each_program
def test_mpirun_master_from_hostfile(tmp_path, program):
    """As the MPI Operator runs it: no MASTER_ADDR, the hostfile named by OMPI_MCA_orte_default_hostfile
    in mpirun's environment (OpenMPI forwards OMPI_MCA_* to the ranks); rank 0 is its first host."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# written like the MPI Operator's\nlocalhost slots=2\n")
    env = clean_env(OMPI_MCA_orte_default_hostfile=str(hostfile), MASTER_PORT=str(free_port()))
    cmd = ["mpirun", "--allow-run-as-root", "-np", "2", "-x", "MASTER_PORT", *PROGRAMS[program]]
    reports = run(cmd, env=env)
    assert_group(reports, "openmpi")
    assert reports[0]["master_addr"] == "localhost"


@needs_mpirun
@each_program
def test_mpirun_master_broadcast_over_mpi(program):
    """No MASTER_ADDR and no hostfile: rank 0 sends its own address to every rank with mpi4py."""
    cmd = [*MPIRUN, "-x", f"MASTER_PORT={free_port()}", *PROGRAMS[program]]
    reports = run(cmd)
    assert_group(reports, "openmpi")
    assert reports[0]["master_addr"] == own_address()


# -- per-node rows: one process per node (LWS pod, Trainer node) spawns its local ranks -------------

@pytest.mark.parametrize("row", ["lws", "trainer-torch"])
def test_per_node_rows_two_nodes_of_two_ranks(row):
    """Two "nodes" on this machine, each told only its node index, each running
    `dscluster launch --nproc 2 -- PROGRAM` as its pod's command: 4 ranks in one real gloo group,
    ranks numbered node by node."""
    port = str(free_port())
    if row == "lws":  # LeaderWorkerSet's variables; ranks per pod come from --nproc (here 2)
        nodes = [dict(LWS_LEADER_ADDRESS="127.0.0.1", LWS_GROUP_SIZE="2", LWS_WORKER_INDEX=str(i), MASTER_PORT=port)
                 for i in range(2)]
    else:  # Kubeflow Trainer's torch plugin
        nodes = [dict(PET_NNODES="2", PET_NODE_RANK=str(i), PET_NPROC_PER_NODE="2", PET_MASTER_ADDR="127.0.0.1",
                      PET_MASTER_PORT=port) for i in range(2)]
    procs = [subprocess.Popen([sys.executable, "-m", "dscluster", "launch", "--nproc", "2", "--", sys.executable, PROBE],
                              stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=clean_env(**env)) for env in nodes]
    outputs = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=120)
            assert proc.returncode == 0, (out + err)[-3000:]
            outputs.append(out)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    reports = []
    for node, out in enumerate(outputs):
        for line in out.splitlines():
            prefix, _, body = line.partition("] ")
            report = json.loads(body)
            assert prefix == f"[rank {report['rank']}"  # the launcher prefixes the global rank
            assert report["node_rank"] == node
            reports.append(report)
    reports.sort(key=lambda r: r["rank"])
    assert [r["rank"] for r in reports] == [0, 1, 2, 3]
    assert [r["local_rank"] for r in reports] == [0, 1, 0, 1]
    assert {r["world_size"] for r in reports} == {4} and {r["exported_local_size"] for r in reports} == {"2"}
    assert {r["all_reduce"] for r in reports} == {10} and {r["launcher"] for r in reports} == {"local"}
    assert {(r["master_addr"], r["master_port"]) for r in reports} == {("127.0.0.1", int(port))}


# -- the local launcher as a supervisor -----------------------------------------------------------


def test_output_is_prefixed_with_the_rank():
    proc = subprocess.run([sys.executable, "-m", "dscluster", "launch", "--nproc", "2", "--", sys.executable, "-c",
                           "import os; print('hello from', os.environ['RANK'], os.environ['LOCAL_SIZE'])"],
                          capture_output=True, text=True, timeout=60, env=clean_env())
    assert proc.returncode == 0
    assert sorted(proc.stdout.splitlines()) == ["[rank 0] hello from 0 2", "[rank 1] hello from 1 2"]


def test_one_rank_failing_stops_the_others_with_its_code():
    script = "import os, sys, time\nif os.environ['RANK'] == '1': sys.exit(7)\ntime.sleep(120)"
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "dscluster", "launch", "--nproc", "2", "--grace", "3", "--",
                           sys.executable, "-c", script], capture_output=True, text=True, timeout=60, env=clean_env())
    assert proc.returncode == 7
    assert time.monotonic() - started < 20, "rank 0 should have been stopped, not waited for"
    assert "rank 1 exited with code 7; stopping the other ranks" in proc.stderr


def test_a_rank_ignoring_sigterm_is_killed_after_the_grace(tmp_path):
    pids = tmp_path / "pids"
    script = ("import os, signal, sys, time\n"
              f"open({str(pids)!r} + os.environ['RANK'], 'w').write(str(os.getpid()))\n"
              "if os.environ['RANK'] == '0':\n"
              "    signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(120)\n"
              "time.sleep(1); sys.exit(5)")
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "dscluster", "launch", "--nproc", "2", "--grace", "1", "--",
                           sys.executable, "-c", script], capture_output=True, text=True, timeout=60, env=clean_env())
    assert proc.returncode == 5, proc.stderr
    assert time.monotonic() - started < 20
    assert not _alive(int((tmp_path / "pids0").read_text())), "rank 0 survived SIGKILL after the grace"


def test_sigterm_is_forwarded_to_every_rank(tmp_path):
    script = ("import os, signal, sys, time\n"
              "def bye(*_):\n"
              f"    open(os.path.join({str(tmp_path)!r}, 'got-' + os.environ['RANK']), 'w').close(); sys.exit(0)\n"
              "signal.signal(signal.SIGTERM, bye)\nprint('up', flush=True)\ntime.sleep(120)")
    proc = subprocess.Popen([sys.executable, "-m", "dscluster", "launch", "--nproc", "2", "--", sys.executable, "-c",
                             script], stdout=subprocess.PIPE, text=True, env=clean_env())
    assert proc.stdout.readline().endswith("up\n") and proc.stdout.readline().endswith("up\n")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["got-0", "got-1"]


def test_sigterm_to_ranks_without_a_handler_exits_128_plus_15():
    script = "import time\nprint('up', flush=True)\ntime.sleep(120)"
    proc = subprocess.Popen([sys.executable, "-m", "dscluster", "launch", "--nproc", "2", "--", sys.executable, "-c",
                             script], stdout=subprocess.PIPE, text=True, env=clean_env())
    assert proc.stdout.readline().endswith("up\n") and proc.stdout.readline().endswith("up\n")
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 128 + signal.SIGTERM
    assert time.monotonic() - started < 10


def test_a_rank_killed_by_a_signal_is_a_peer_failure_exit_3():
    script = "import os, signal, time\nif os.environ['RANK'] == '1': os.kill(os.getpid(), signal.SIGKILL)\ntime.sleep(120)"
    proc = subprocess.run([sys.executable, "-m", "dscluster", "launch", "--nproc", "2", "--grace", "2", "--",
                           sys.executable, "-c", script], capture_output=True, text=True, timeout=60, env=clean_env())
    assert proc.returncode == 3
    assert "rank 1 killed by SIGKILL; stopping the other ranks" in proc.stderr


def test_ranks_die_with_a_killed_launcher(tmp_path):
    """SIGKILL cannot be forwarded: the ranks must still go (PR_SET_PDEATHSIG), never linger."""
    pids = tmp_path / "pids"
    script = f"import os, time\nopen({str(pids)!r} + os.environ['RANK'], 'w').write(str(os.getpid()))\ntime.sleep(120)"
    proc = subprocess.Popen([sys.executable, "-m", "dscluster", "launch", "--nproc", "2", "--", sys.executable, "-c",
                             script], env=clean_env())
    deadline = time.monotonic() + 30
    while len(list(tmp_path.glob("pids*"))) < 2:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    rank_pids = [int(p.read_text()) for p in tmp_path.glob("pids*")]
    proc.kill()
    proc.wait(10)
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in rank_pids):
        assert time.monotonic() < deadline, "ranks outlived their launcher"
        time.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie is gone for our purpose
        return f.read().split(")")[-1].split()[0] != "Z"


def test_launch_without_a_command_exits_2():
    proc = subprocess.run([sys.executable, "-m", "dscluster", "launch", "--nproc", "2"], capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode == 2 and "needs a command" in proc.stderr


def test_launch_of_a_missing_command_exits_2():
    proc = subprocess.run([sys.executable, "-m", "dscluster", "launch", "--nproc", "2", "--", "/no/such/program"],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "/no/such/program" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("local_size", [None, "2"])
def test_hand_written_environment_serves(tiny, local_size):
    """Two `dscluster serve` processes given only RANK, LOCAL_RANK, WORLD_SIZE and the master (and
    maybe DeepSpeed's LOCAL_SIZE): ranks that guess their node size differently must still agree
    on how to all-reduce, answer, and drain on SIGTERM."""
    import httpx

    from servers import poll_ready  # tests/e2e/servers.py

    http, master = free_port(), free_port()
    procs = []
    for rank in (0, 1):
        env = clean_env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                        MASTER_PORT=str(master), **({"LOCAL_SIZE": local_size} if local_size else {}))
        procs.append(subprocess.Popen([sys.executable, "-m", "dscluster", "serve", tiny, "--port", str(http),
                                       "--heartbeat-timeout", "10"], env=env, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL, start_new_session=True))
    try:
        assert poll_ready(f"http://127.0.0.1:{http}", lambda: all(p.poll() is None for p in procs), 180), \
            "not ready"
        r = httpx.post(f"http://127.0.0.1:{http}/v1/completions", timeout=60,
                       json={"prompt": "hello", "max_tokens": 4, "temperature": 0, "ignore_eos": True})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
        procs[0].send_signal(signal.SIGTERM)
        assert [p.wait(60) for p in procs] == [0, 0]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(10)
