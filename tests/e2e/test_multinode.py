"""Several nodes on one machine (network namespaces, tests/e2e/netns.py), one `dscluster serve` per
node started exactly as the Kubernetes manifests start it: LeaderWorkerSet variables
(`LWS_LEADER_ADDRESS`, `LWS_GROUP_SIZE`, `LWS_WORKER_INDEX`, `MASTER_PORT`) or Kubeflow Trainer's
(`PET_*`), the master found by name, `GLOO_SOCKET_IFNAME` set to the node's interface.

Then the faults a cluster has, each with a bound on detection: a rank killed (idle, mid-batch),
rank 0 killed, a node's link cut (idle, mid-batch), a hung rank, SIGTERM to the whole group; and
the start-up faults: a node that never arrives, a wrong master address, a port already taken, a
model directory missing on one node. Measured times are printed as `fault-timing:` lines
(`pytest -s`); docs/faults.md records them.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import torch

from netns import Cluster, unavailable_reason

REASON = unavailable_reason()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"multi-node tests need network namespaces: {REASON}")

INTERVAL, TIMEOUT = 0.5, 3.0      # heartbeat settings for every group here
NOTICED = 10.0                    # readiness must turn 503 within this after a fault
GONE = 30.0                       # every process must have exited within this after a fault
RENDEZVOUS = 4.0                  # --rendezvous-timeout for the start-up faults
STARTUP_BOUND = RENDEZVOUS + 20.0  # the timeout, the client's connect retries, interpreter start
HTTP_PORT, MASTER_PORT = 8000, 29500
LONG = {"prompt": ["The cluster", "A node", "One rank", "Every batch"], "max_tokens": 1500, "temperature": 0,
        "ignore_eos": True}


def lws_env(node_index: int, nodes: int, leader: str = "node0") -> dict[str, str]:
    return {"LWS_LEADER_ADDRESS": leader, "LWS_GROUP_SIZE": str(nodes), "LWS_WORKER_INDEX": str(node_index),
            "MASTER_PORT": str(MASTER_PORT)}


def trainer_env(node_index: int, nodes: int, nproc: int) -> dict[str, str]:
    return {"PET_NNODES": str(nodes), "PET_NODE_RANK": str(node_index), "PET_NPROC_PER_NODE": str(nproc),
            "PET_MASTER_ADDR": "node0", "PET_MASTER_PORT": str(MASTER_PORT)}


def clean_env() -> dict[str, str]:
    """The test process's environment without any launcher's variables."""
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT",
            "DSCLUSTER_LAUNCHER", "TORCHELASTIC_RUN_ID")
    env = {k: v for k, v in os.environ.items()
           if k not in drop and not k.startswith(("LWS_", "PET_", "OMPI_", "PMI_", "SLURM_"))}
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    return env


@dataclass
class Group:
    """One `dscluster serve` per node; logs in files, rank 0's HTTP reachable from this process."""

    cluster: Cluster
    model: str
    logdir: Path
    procs: list = field(default_factory=list)

    def start(self, node: int, launcher_env: dict[str, str], *args: str, model: str | None = None,
              hide: tuple[str, ...] = ()):
        n = self.cluster.nodes[node]
        env = {**clean_env(), **launcher_env, "GLOO_SOCKET_IFNAME": n.ifname}
        cmd = [sys.executable, "-m", "dscluster", "serve", model or self.model, "--host", "0.0.0.0",
               "--port", str(HTTP_PORT), "--heartbeat-interval", str(INTERVAL),
               "--heartbeat-timeout", str(TIMEOUT), *args]
        proc = n.popen(cmd, env=env, log=self.logdir / f"{n.name}.log", hide=hide)
        self.procs.append(proc)
        return proc

    @property
    def url(self) -> str:
        return f"http://{self.cluster.nodes[0].addr}:{HTTP_PORT}"

    def ready_status(self) -> int | None:
        try:
            return httpx.get(f"{self.url}/health/ready", timeout=1.0).status_code
        except httpx.HTTPError:
            return None

    def wait_ready(self, timeout: float = 180.0) -> float:
        start = time.monotonic()
        while self.ready_status() != 200:
            for i, p in enumerate(self.procs):
                assert p.poll() is None, f"node{i} exited {p.returncode} before ready:\n{self.logs()}"
            assert time.monotonic() - start < timeout, f"not ready within {timeout} s:\n{self.logs()}"
            time.sleep(0.2)
        return time.monotonic() - start

    def log(self, node: int) -> str:
        path = self.logdir / f"node{node}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def logs(self, tail: int = 3000) -> str:
        return "\n".join(f"--- node{i}\n{self.log(i)[-tail:]}" for i in range(len(self.cluster.nodes)))

    def wait_all(self, bound: float, start: float) -> list[int]:
        """Every process's exit code; fails naming the ones still running `bound` s after `start`."""
        codes = []
        for i, p in enumerate(self.procs):
            try:
                codes.append(p.wait(timeout=max(0.1, start + bound - time.monotonic())))
            except subprocess_timeout():
                pytest.fail(f"node{i} still running {bound} s after the fault:\n{self.logs()}")
        return codes


def subprocess_timeout():
    import subprocess

    return subprocess.TimeoutExpired


@pytest.fixture
def nodes2(tmp_path):
    with Cluster(2) as cluster:
        yield cluster
    assert not cluster.leftovers()


@pytest.fixture
def nodes3(tmp_path):
    with Cluster(3) as cluster:
        yield cluster
    assert not cluster.leftovers()


def report(name: str, group: Group | None = None, **times: float) -> None:
    print(f"fault-timing: {name} " + " ".join(f"{k}={v:.2f}s" for k, v in times.items()), flush=True)
    for i in range(len(group.cluster.nodes) if group else 0):
        for line in group.log(i).splitlines():
            if "dscluster:" in line or "dscluster launch:" in line:
                print(f"fault-message: {name} node{i}: {line.strip()[:400]}")


# ---------------------------------------------------------------------------------------------
# The harness itself


def test_nodes_find_each_other_by_name_and_teardown_removes_everything():
    listener = ("import socket; s = socket.create_server(('0.0.0.0', 7777)); c, a = s.accept(); "
                "c.sendall(socket.gethostname().encode() + b' ' + a[0].encode())")
    with Cluster(2) as cluster:
        n0, n1 = cluster.nodes
        server = n1.popen([sys.executable, "-c", listener])
        dial = ("import socket, time\n"
                "for _ in range(100):\n"
                "    try:\n"
                "        s = socket.create_connection(('node1', 7777), timeout=2); break\n"
                "    except OSError: time.sleep(0.05)\n"
                "print(socket.gethostbyname('node1'), s.recv(100).decode())")
        out = n0.run([sys.executable, "-c", dial], timeout=30)
        assert out.returncode == 0, out.stderr
        assert out.stdout.split() == [n1.addr, "node1", n0.addr], "by name, to node1, from node0's address"
        assert server.wait(10) == 0
        assert n0.run(["hostname"]).stdout.strip() == "node0"
        # The test process reaches a node over the bridge; a cut link isolates it.
        sleeper = n1.popen([sys.executable, "-c", listener])
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection((n1.addr, 7777), timeout=2).close()
                break
            except OSError:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        sleeper.wait(10)
        n1.link(up=False)
        cut = n0.run([sys.executable, "-c", "import socket; socket.create_connection(('node1', 7777), timeout=1)"])
        assert cut.returncode != 0
        # Something left running in a node is killed at teardown, children included.
        n1.popen(["sh", "-c", "sleep 300 & sleep 300"])
        time.sleep(0.3)
        assert len(n1.pids()) >= 2
    assert cluster.leftovers() == []
    assert not Path(f"/etc/netns/{n0.ns}").exists()


# ---------------------------------------------------------------------------------------------
# Start-up faults: all end before serving starts, within the rendezvous timeout plus slack


def test_node_that_never_arrives(nodes2, tiny, tmp_path):
    group = Group(nodes2, tiny, tmp_path)
    start = time.monotonic()
    group.start(0, lws_env(0, 2), "--rendezvous-timeout", str(RENDEZVOUS))
    [code] = group.wait_all(STARTUP_BOUND, start)
    took = time.monotonic() - start
    report("node-never-arrives", group, exited=took)
    assert code == 3, group.logs()
    assert "rendezvous timed out after 4 s" in group.log(0)
    assert "only 1 of 2 ranks reached the master at node0:29500" in group.log(0)


def test_wrong_master_address(nodes2, tiny, tmp_path):
    """node1 is told the leader is `node9`, which no name service knows: it fails naming that
    address; rank 0, waiting for it, fails naming the missing rank. Both within the bound."""
    group = Group(nodes2, tiny, tmp_path)
    start = time.monotonic()
    group.start(0, lws_env(0, 2), "--rendezvous-timeout", str(RENDEZVOUS))
    group.start(1, lws_env(1, 2, leader="node9"), "--rendezvous-timeout", str(RENDEZVOUS))
    codes = group.wait_all(STARTUP_BOUND, start)
    report("wrong-master-address", group, exited=time.monotonic() - start)
    assert codes == [3, 3], group.logs()
    assert "the master node9:29500 (MASTER_ADDR, MASTER_PORT) does not resolve" in group.log(1)
    assert "only 1 of 2 ranks" in group.log(0)


@pytest.mark.parametrize("port", ["http", "master"])
def test_port_already_taken_on_the_leader(nodes2, tiny, tmp_path, port):
    """Something else listens on node0's HTTP port or MASTER_PORT: rank 0 says which, exit 2, at
    once; the other node, left waiting, gives up at the rendezvous timeout."""
    group = Group(nodes2, tiny, tmp_path)
    taken = HTTP_PORT if port == "http" else MASTER_PORT
    squatter = nodes2.nodes[0].popen([sys.executable, "-c",
                                      f"import socket, time; s = socket.create_server(('0.0.0.0', {taken})); "
                                      "print('listening', flush=True); time.sleep(300)"],
                                     log=tmp_path / "squatter.log")
    deadline = time.monotonic() + 20
    while "listening" not in (tmp_path / "squatter.log").read_text():
        assert squatter.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    start = time.monotonic()
    group.start(0, lws_env(0, 2), "--rendezvous-timeout", str(RENDEZVOUS))
    group.start(1, lws_env(1, 2), "--rendezvous-timeout", str(RENDEZVOUS))
    codes = group.wait_all(STARTUP_BOUND, start)
    report(f"{port}-port-taken", group, exited=time.monotonic() - start)
    assert codes[0] == 2, group.logs()
    expected = (f"cannot listen on 0.0.0.0:{HTTP_PORT}" if port == "http"
                else f"rank 0 cannot listen on MASTER_PORT {MASTER_PORT}")
    assert expected in group.log(0)
    assert codes[1] == 3, group.logs()
    assert "rendezvous timed out" in group.log(1)
    if port == "master":  # node1 reached the squatter, which never answers the store's protocol
        assert f"something at node0:{MASTER_PORT} accepted the connection but never answered" in group.log(1)


def test_model_directory_missing_on_one_node(nodes2, tiny, tmp_path):
    """The same command on both nodes; on node1 the model's volume is not mounted (an empty
    directory covers it). node1 fails at once naming the path (exit 2); node0 at the timeout."""
    group = Group(nodes2, tiny, tmp_path)
    volume = str(Path(tiny).parent)
    start = time.monotonic()
    group.start(0, lws_env(0, 2), "--rendezvous-timeout", str(RENDEZVOUS))
    group.start(1, lws_env(1, 2), "--rendezvous-timeout", str(RENDEZVOUS), hide=(volume,))
    codes = group.wait_all(STARTUP_BOUND, start)
    report("model-missing-on-one-node", group, exited=time.monotonic() - start)
    assert codes == [3, 2], group.logs()
    assert f"model {tiny!r}: no such directory" in group.log(1)
    assert "only 1 of 2 ranks" in group.log(0)


# ---------------------------------------------------------------------------------------------
# A group across nodes, and graceful drain


def completion(group: Group, body: dict, timeout: float = 120.0) -> httpx.Response:
    return httpx.post(f"{group.url}/v1/completions", json=body, timeout=timeout)


class InFlight:
    """A long completion running in a thread: its outcome (a response or an exception) and when."""

    def __init__(self, group: Group, body: dict = LONG):
        self.outcome: httpx.Response | Exception | None = None
        self.finished_at: float | None = None
        self.thread = threading.Thread(target=self._run, args=(group, body), daemon=True)
        self.thread.start()

    def _run(self, group: Group, body: dict) -> None:
        try:
            self.outcome = completion(group, body, timeout=GONE + 30)
        except Exception as exc:  # noqa: BLE001 - the outcome under test
            self.outcome = exc
        self.finished_at = time.monotonic()

    def result(self, timeout: float):
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the in-flight request hung"
        return self.outcome


def test_two_nodes_two_ranks_each_serve_then_drain_on_sigterm(nodes2, tiny, tmp_path):
    """Kubeflow Trainer style (PET_*): each node's `dscluster serve` spawns its 2 local ranks
    (node1's are ranks 2 and 3), ZeRO-3 across all 4. SIGTERM to every node at once, as when the
    group is deleted: the request in flight is answered in full (every token it asked for, the
    unsharded engine's text), and every process exits 0."""
    group = Group(nodes2, tiny, tmp_path)
    for i in range(2):
        group.start(i, trainer_env(i, 2, 2), "--engine", "zero3")
    took = group.wait_ready()
    report("startup-2x2-zero3", ready=took)
    assert "[rank 3]" in group.log(1) and "[rank 1]" in group.log(0)
    models = httpx.get(f"{group.url}/v1/models", timeout=10).json()
    assert models["data"][0]["id"]
    first = completion(group, {"prompt": "hello", "max_tokens": 8, "temperature": 0})
    assert first.status_code == 200, first.text
    assert first.json()["usage"]["completion_tokens"] >= 1
    assert "LOCAL_SIZE 2 for a world of 4: all-reduce over the process group" in group.log(1)

    body = {"prompt": "a long answer", "max_tokens": 60, "temperature": 0, "ignore_eos": True}
    inflight = InFlight(group, body)
    time.sleep(1.0)
    assert inflight.outcome is None, f"the request ended before SIGTERM: {inflight.outcome}"
    start = time.monotonic()
    for p in group.procs:
        p.send_signal(signal.SIGTERM)
    noticed, status = _wait_not_ready(group, start)
    # Uvicorn closes its listening socket on SIGTERM: a probe gets 503 or a refused connection,
    # both failures to a readiness probe.
    assert status in (503, None)
    codes = group.wait_all(GONE, start)
    report("sigterm-group-drain", group, not_ready=noticed - start, all_exited=time.monotonic() - start)
    response = inflight.result(10)
    assert isinstance(response, httpx.Response) and response.status_code == 200, response
    assert codes == [0, 0], group.logs()
    answer = response.json()
    assert answer["choices"][0]["finish_reason"] == "length"
    assert answer["usage"]["completion_tokens"] == body["max_tokens"]
    assert answer["choices"][0]["text"] == unsharded_text(tiny, body)


def unsharded_text(model: str, body: dict) -> str:
    """The completion's text from the unsharded engine in this process."""
    from dscluster.engine.api import GenerationRequest, SamplingParams
    from dscluster.engine.client import open_engine

    engine = open_engine(model)
    try:
        ids = engine.info.tokenizer(body["prompt"])["input_ids"]
        (result,) = engine.generate([GenerationRequest(tuple(ids), SamplingParams(
            max_tokens=body["max_tokens"], temperature=0, ignore_eos=body.get("ignore_eos", False)))])
        return engine.info.tokenizer.decode(result.token_ids, skip_special_tokens=True)
    finally:
        engine.shutdown()


def test_two_nodes_two_ranks_each_tensor_parallel_gqa_equals_unsharded(nodes2, gqa, tmp_path):
    """tp=4 over 2 nodes x 2 ranks (Kubeflow Trainer style) on a grouped-query-attention model
    stored as many files: each rank reads only its quarter, and the answers are the unsharded
    model's (transformers' from_pretrained in this process): greedy text identical, logits within
    float tolerance."""
    from dscluster.engine.api import GenerationRequest, SamplingParams
    from dscluster.engine.client import open_engine

    group = Group(nodes2, gqa, tmp_path)
    for i in range(2):
        group.start(i, trainer_env(i, 2, 2), "--engine", "tp")
    report("startup-2x2-tp-gqa", ready=group.wait_ready())
    assert "tp=4, each rank read its own shards" in group.log(1)
    prompts = [[1, 614, 15, 591, 4, 788], [1, 20, 30, 40, 50, 60]]
    ref = open_engine(gqa)
    want_logits = ref.predict([torch.tensor(p) for p in prompts])
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    want_ids = [r.token_ids for r in ref.generate([GenerationRequest(tuple(p), params) for p in prompts])]
    tokenizer = ref.info.tokenizer
    predicted = httpx.post(f"{group.url}/v1/predict", json={"inputs": prompts}, timeout=60)
    assert predicted.status_code == 200, predicted.text
    for got, want in zip(predicted.json()["outputs"], want_logits, strict=True):
        diff = (torch.tensor(got) - want).abs().max().item()
        assert diff < 1e-5, f"tp=4 over 2 nodes differs from the unsharded model by {diff}"
    for prompt, ids in zip(prompts, want_ids, strict=True):
        answer = completion(group, {"prompt": prompt, "max_tokens": 10, "temperature": 0, "ignore_eos": True})
        assert answer.status_code == 200, answer.text
        assert answer.json()["choices"][0]["text"] == tokenizer.decode(ids, skip_special_tokens=True)
    for p in group.procs:
        p.send_signal(signal.SIGTERM)
    assert group.wait_all(GONE, time.monotonic()) == [0, 0], group.logs()


def _wait_not_ready(group: Group, start: float, bound: float = NOTICED) -> tuple[float, int | None]:
    """When readiness stopped answering 200, and what it answered instead (None: no answer)."""
    while (status := group.ready_status()) == 200:
        if time.monotonic() - start > bound:
            pytest.fail(f"readiness still 200 {bound} s after the fault:\n{group.logs()}")
        time.sleep(0.05)
    return time.monotonic(), status


# ---------------------------------------------------------------------------------------------
# Runtime faults: one rank per node, tensor parallel across the nodes


@pytest.fixture
def serving(nodes2, tiny, tmp_path):
    """Two nodes serving under LWS variables, ready, having answered one completion."""
    group = Group(nodes2, tiny, tmp_path)
    for i in range(2):
        group.start(i, lws_env(i, 2))
    took = group.wait_ready()
    report("startup-2x1-tp", ready=took)
    first = completion(group, {"prompt": "hello", "max_tokens": 4, "temperature": 0})
    assert first.status_code == 200, first.text
    return group


def _fault_and_measure(group: Group, name: str, fault, mid_batch: bool, survivors: list[int]):
    inflight = InFlight(group) if mid_batch else None
    if inflight:
        time.sleep(1.5)
        assert inflight.outcome is None, f"the long request ended before the fault: {inflight.outcome}"
    start = time.monotonic()
    fault()
    noticed, status = _wait_not_ready(group, start)
    if 0 in survivors:
        assert status == 503, f"rank 0 alive: readiness must answer 503, got {status}"
    codes = {}
    for i in survivors:
        try:
            codes[i] = group.procs[i].wait(timeout=max(0.1, start + GONE - time.monotonic()))
        except subprocess_timeout():
            pytest.fail(f"node{i} still running {GONE} s after the fault:\n{group.logs()}")
    gone = time.monotonic()
    times = {"not_ready": noticed - start, "all_exited": gone - start}
    if inflight:
        outcome = inflight.result(GONE)
        assert not (isinstance(outcome, httpx.Response) and outcome.status_code == 200), \
            "a request in flight when the group broke must not succeed"
        if 0 in survivors:  # rank 0 lives long enough to answer: a JSON 503 naming the failure
            assert isinstance(outcome, httpx.Response), f"connection dropped: {outcome!r}"
            assert outcome.status_code == 503, outcome.text
            assert "the group is broken" in outcome.json()["error"]["message"]
        times["request_failed"] = inflight.finished_at - start
    report(name, group, **times)
    if inflight:
        print(f"fault-outcome: {name} request: "
              f"{getattr(outcome, 'status_code', None) or type(outcome).__name__} {getattr(outcome, 'text', '')[:200]}")
    return codes


@pytest.mark.parametrize("when", ["idle", "mid-batch"])
def test_worker_killed(serving, when):
    group = serving
    codes = _fault_and_measure(group, f"worker-sigkill-{when}", lambda: group.procs[1].send_signal(signal.SIGKILL),
                               when == "mid-batch", survivors=[0])
    assert codes[0] == 3, group.logs()
    assert "rank 1 (host node1)" in group.log(0), "the exit message names the failed rank and node"
    assert "group broken" in group.log(0)


def test_rank0_killed(serving):
    group = serving
    codes = _fault_and_measure(group, "rank0-sigkill", lambda: group.procs[0].send_signal(signal.SIGKILL),
                               False, survivors=[1])
    assert codes[1] == 3, group.logs()
    assert "rank 1: group broken" in group.log(1) and "rank 0" in group.log(1)


@pytest.mark.parametrize("when", ["idle", "mid-batch"])
def test_link_cut(serving, when):
    """node1's only link goes down: no process dies, no socket closes; heartbeats stop. Rank 0
    names node1; node1's rank, cut off from rank 0's store, gives up too."""
    group = serving
    codes = _fault_and_measure(group, f"link-cut-{when}", lambda: group.cluster.nodes[1].link(up=False),
                               when == "mid-batch", survivors=[0, 1])
    assert codes == {0: 3, 1: 3}, group.logs()
    assert "rank 1 (host node1)" in group.log(0)
    assert "rank 0" in group.log(1)


def test_hung_worker(serving):
    """SIGSTOP: sockets stay open, only the liveness timeout can notice. After SIGCONT the
    worker finds rank 0 gone and exits non-zero as well."""
    group = serving
    try:
        codes = _fault_and_measure(group, "worker-sigstop", lambda: group.procs[1].send_signal(signal.SIGSTOP),
                                   False, survivors=[0])
    finally:
        group.procs[1].send_signal(signal.SIGCONT)
    assert codes[0] == 3, group.logs()
    assert "rank 1 (host node1) stopped answering" in group.log(0)
    resumed = group.procs[1].wait(timeout=GONE)
    assert resumed == 3, group.logs()


def test_three_nodes_one_cut_off(nodes3, tiny, tmp_path):
    """Three nodes (LWS, ZeRO-3 over 3 ranks); node2's link goes down mid-batch. Rank 0 names
    node2; node1, which lost nothing itself, is stopped with the group; node2 gives up alone."""
    group = Group(nodes3, tiny, tmp_path)
    for i in range(3):
        group.start(i, lws_env(i, 3), "--engine", "zero3")
    report("startup-3x1-zero3", ready=group.wait_ready())
    first = completion(group, {"prompt": "hello", "max_tokens": 4, "temperature": 0})
    assert first.status_code == 200, first.text
    codes = _fault_and_measure(group, "link-cut-mid-batch-3-nodes", lambda: nodes3.nodes[2].link(up=False),
                               True, survivors=[0, 1, 2])
    assert codes == {0: 3, 1: 3, 2: 3}, group.logs()
    assert "rank 2 (host node2)" in group.log(0)
    assert "rank 0" in group.log(2)
