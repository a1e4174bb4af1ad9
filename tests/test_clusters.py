"""The cluster configs in clusters/.

The launcher YAMLs pass the checks `ray up` runs before it touches a cloud, the KubeRay manifests hold
the fields the operator requires, and the fake multi-node cluster really scales out from a 0-CPU head
for a training job (the autoscaler, placement groups, Ray Data and Ray Train are all real there).
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import jsonschema
import psutil
import pytest
import yaml

from conftest import NO_DRAIN, free_ports

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CLUSTERS = ROOT / "clusters"
LAUNCHER_YAMLS = ["aws.yaml", "gcp.yaml"]


def _load(name: str) -> dict[str, Any]:
    return yaml.safe_load((CLUSTERS / name).read_text())


def _ray_schema() -> dict[str, Any]:
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def _ray_up_checks(config: dict[str, Any]) -> dict[str, Any]:
    """What `ray up` does before it calls the cloud: fill in the provider's defaults.yaml, then check
    the schema and the node types (REFERENCE.md section 5; private API, offline, about 10 ms)."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


# ---------------------------------------------------------------------------------------------------
# Launcher YAMLs (aws, gcp)


@pytest.mark.parametrize("name", LAUNCHER_YAMLS)
def test_launcher_yaml_passes_the_checks_ray_up_runs(name: str) -> None:
    config = _ray_up_checks(_load(name))
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0, "the head runs the driver, GCS and autoscaler only"
    gpu_groups = {n: t for n, t in types.items() if t["resources"].get("GPU", 0) >= 1}
    assert gpu_groups, f"{name} has no GPU worker type"
    for group in gpu_groups.values():
        assert group.get("min_workers", 0) == 0  # idle GPUs cost nothing
        assert group["max_workers"] >= 1
    assert config["idle_timeout_minutes"] > 0
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--head" in head_start and "--autoscaling-config=~/ray_bootstrap_config.yaml" in head_start
    # The package comes from the synced working tree, installed after torch and DeepSpeed.
    assert config["file_mounts"]["~/facemae"] == "."
    setup = config["setup_commands"]
    installs = [next(i for i, c in enumerate(setup) if key in c)
                for key in ("torch torchvision", "--no-build-isolation deepspeed", "--no-deps -e ~/facemae")]
    assert installs == sorted(installs), setup
    assert any('"ray[default,train,tune,data]==2.60.0"' in c for c in setup)


@pytest.mark.parametrize(("break_it", "error", "message"), [
    pytest.param(lambda c: c["available_node_types"]["ray.worker.gpu"]["resources"].update(GPU=0.5),
                 jsonschema.ValidationError, "0.5 is not of type 'integer'", id="fractional-gpu"),
    pytest.param(lambda c: c.update(idle_timeout_minute=c.pop("idle_timeout_minutes")),
                 jsonschema.ValidationError, "'idle_timeout_minute' was unexpected", id="misspelt-key"),
    pytest.param(lambda c: c.update(head_node_type="ray.head.cpu"),
                 ValueError, "`head_node_type` must be one of", id="unknown-head-type"),
    pytest.param(lambda c: c["available_node_types"]["ray.worker.gpu"].update(min_workers=c["max_workers"] + 1),
                 ValueError, "smaller than the sum of `min_workers`", id="min-workers-above-cluster-max"),
])
def test_the_checks_reject_a_broken_copy(break_it: Any, error: type[Exception], message: str) -> None:
    config = _load("aws.yaml")
    _ray_up_checks(config)  # the original passes, so the failure below is the edit's
    break_it(config)
    with pytest.raises(error, match=re.escape(message)):
        _ray_up_checks(config)


def test_a_launcher_yaml_without_provider_fails_the_schema() -> None:
    config = _load("gcp.yaml")
    del config["provider"]
    with pytest.raises(jsonschema.ValidationError, match="'provider' is a required property"):
        jsonschema.validate(config, _ray_schema())


# ---------------------------------------------------------------------------------------------------
# Local fake cluster


def test_local_fake_yaml_is_complete_as_the_autoscaler_reads_it() -> None:
    """`ray start --autoscaling-config` hands the file to the fake provider as is, with no defaults
    filled in, so it must pass the schema raw and hold every key the autoscaler reads."""
    config = _load("local-fake.yaml")
    jsonschema.validate(config, _ray_schema())
    assert config["provider"]["type"] == "fake_multinode"
    assert config["provider"]["use_node_id_as_ip"] is True  # all fake nodes share one IP
    # The provider tags the head with this fixed type name (FAKE_HEAD_NODE_TYPE).
    assert config["head_node_type"] == "ray.head.default"
    head = config["available_node_types"]["ray.head.default"]
    assert head["resources"] == {"CPU": 0}
    workers = {n: t for n, t in config["available_node_types"].items() if n != "ray.head.default"}
    assert workers and all(t["min_workers"] == 0 and t["resources"].get("CPU", 0) >= 1 for t in workers.values())
    from ray.autoscaler._private.util import validate_config

    validate_config(copy.deepcopy(config))  # also needs cluster_synced_files and a known head type


# ---------------------------------------------------------------------------------------------------
# KubeRay


def _kuberay_docs() -> dict[str, dict[str, Any]]:
    docs = {}
    for path in sorted(CLUSTERS.glob("kuberay*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                docs[doc["kind"]] = doc
    return docs


def _check_pod_template(template: dict[str, Any], where: str) -> list[dict[str, Any]]:
    containers = template["spec"]["containers"]
    assert containers and all(c.get("name") and c.get("image") for c in containers), where
    return containers


def _check_cluster_spec(spec: dict[str, Any]) -> None:
    head = spec["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict)
    (ray_head, *_) = _check_pod_template(head["template"], "headGroupSpec")
    assert f"ray{spec['rayVersion']}" in ray_head["image"]  # an image built FROM rayproject/ray:<rayVersion>
    assert "nvidia.com/gpu" not in ray_head.get("resources", {}).get("limits", {})
    assert spec["enableInTreeAutoscaling"] is True
    groups = spec["workerGroupSpecs"]
    assert len({g["groupName"] for g in groups}) == len(groups)
    for group in groups:
        assert group["minReplicas"] == 0 <= group.get("replicas", 0) <= group["maxReplicas"], group["groupName"]
        assert isinstance(group["rayStartParams"], dict)
        containers = _check_pod_template(group["template"], group["groupName"])
        limits = containers[0]["resources"]["limits"]
        assert int(limits["nvidia.com/gpu"]) >= 1, group["groupName"]


def test_kuberay_manifests_hold_what_the_operator_requires() -> None:
    docs = _kuberay_docs()
    assert set(docs) == {"RayCluster", "RayJob"}
    for doc in docs.values():
        assert doc["apiVersion"] == "ray.io/v1"
        assert doc["metadata"]["name"]
    cluster = docs["RayCluster"]
    assert cluster["spec"]["rayVersion"] == "2.60.0"
    _check_cluster_spec(cluster["spec"])
    job = docs["RayJob"]["spec"]
    assert job["entrypoint"] == "python jobs/train.py --config jobs/configs/train_gpu.yaml"
    # The job runs on the RayCluster above rather than on a cluster of its own.
    assert job["clusterSelector"] == {"ray.io/cluster": cluster["metadata"]["name"]}
    assert "rayClusterSpec" not in job


# ---------------------------------------------------------------------------------------------------
# Autoscaling for real, with Ray's fake multi-node provider


def _processes_under(temp_dir: str) -> list[psutil.Process]:
    """Ray processes whose command line names this cluster's temp dir (raylets, GCS, agents)."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any(temp_dir in arg for arg in proc.info["cmdline"] or ()):
                found.append(proc)
        except psutil.Error:
            pass
    return found


def _stop(head: subprocess.Popen, temp_dir: str) -> None:
    """Stops the head and every node its autoscaler added, by PID: never `ray stop`, which would end
    every Ray on the machine.

    The fake provider starts a worker node's raylet from the autoscaler's process without Ray's
    fate-sharing (``Node(..., spawn_reaper=False)``), so terminating `ray start --block` leaves it
    running. (RAY_AUTOSCALER_FATESHARE_WORKERS=1 should make the autoscaler stop its nodes on SIGTERM,
    but in Ray 2.60 its handler fails: "'StandardAutoscaler' object has no attribute 'workers'".)
    So the processes are collected first, the head's process tree (which holds the added raylets and
    their workers) and whatever names this cluster's temp dir, and all get SIGTERM at once.
    """
    try:
        tree = psutil.Process(head.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        tree = []
    procs = list({p.pid: p for p in tree + _processes_under(temp_dir)}.values())
    head.terminate()
    for proc in procs:
        try:
            proc.terminate()
        except psutil.NoSuchProcess:
            pass
    for proc in psutil.wait_procs(procs, timeout=10)[1]:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=10)
    try:
        head.wait(timeout=30)
    except subprocess.TimeoutExpired:
        head.kill()
        head.wait()


def _logs(temp_dir: str, name: str, tail: int = 3000) -> str:
    path = Path(temp_dir) / "session_latest" / "logs" / name
    return path.read_text(errors="replace")[-tail:] if path.exists() else f"(no {name})"


def _raylet_running(head: subprocess.Popen) -> bool:
    try:
        children = psutil.Process(head.pid).children()
        return any(p.name() == "raylet" and p.status() != psutil.STATUS_ZOMBIE for p in children)
    except psutil.Error:
        return False


def _start_head(config: dict[str, Any], workdir: Path) -> tuple[subprocess.Popen, str, dict[str, Any]]:
    """One attempt at `ray start --head` on the fake provider, with its own ports and temp dir.

    Returns:
        The `ray start --block` process, the temp dir, and ``{"address", "env"}`` for drivers.

    Raises:
        RuntimeError: The head died while starting (the raylet's fatal line is in the message).
    """
    from ray.autoscaler._private.fake_multi_node.node_provider import FAKE_HEAD_NODE_ID

    gcs, agent, agent_grpc, runtime_env, metrics, client, autoscaler_metrics = free_ports(7)
    temp_dir = tempfile.mkdtemp(prefix="fm-fake-", dir="/tmp")  # short: Ray's socket paths have a length limit
    config = copy.deepcopy(config)
    config["provider"]["gcs_address"] = f"127.0.0.1:{gcs}"  # the added raylets join this head, not :6379
    autoscaling_config = workdir / f"local-fake-{gcs}.yaml"
    autoscaling_config.write_text(yaml.safe_dump(config))
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}",
           "RAY_FAKE_CLUSTER": "1", "RAY_AUTH_MODE": "disabled",  # REFERENCE.md table, row F
           "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",  # row D
           "AUTOSCALER_UPDATE_INTERVAL_S": "1",  # decide every second instead of every 5 s
           "AUTOSCALER_METRIC_PORT": str(autoscaler_metrics),  # not the fixed 44217 another head may hold
           **NO_DRAIN}
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", "--num-cpus=0", f"--port={gcs}",
         "--include-dashboard=false", f"--dashboard-agent-listen-port={agent}",
         f"--dashboard-agent-grpc-port={agent_grpc}", f"--runtime-env-agent-port={runtime_env}",
         f"--metrics-export-port={metrics}", f"--ray-client-server-port={client}",
         f"--temp-dir={temp_dir}", f"--autoscaling-config={autoscaling_config}", "--disable-usage-stats"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # The raylet aborts when its dashboard agent has not written the last of its port files within
    # 15 s (hard-coded in Ray's WaitForPersistedPort, ray-project/ray#65983); on a busy 2-core machine
    # the agent's imports alone can take longer, and the file may appear just after the raylet gave
    # up. So the head is up once that file exists and its raylet still runs 3 s later.
    session = Path(temp_dir) / "session_latest"
    ready = [session / "sockets" / "raylet", session / f"dashboard_agent_listen_port_{FAKE_HEAD_NODE_ID}"]
    deadline, up_since = time.monotonic() + 180, None
    while up_since is None or time.monotonic() < up_since + 3:
        up = all(p.exists() for p in ready) and _raylet_running(head)
        if (up_since is not None and not up) or head.poll() is not None or time.monotonic() > deadline:
            fatal = [ln for ln in _logs(temp_dir, "raylet.out", 10**6).splitlines() if "Check failed" in ln]
            reason = fatal[-1][-400:] if fatal else _logs(temp_dir, "raylet.out", 800)
            _stop(head, temp_dir)
            shutil.rmtree(temp_dir, ignore_errors=True)
            raise RuntimeError(f"ray start --head did not come up: {reason}")
        if up and up_since is None:
            up_since = time.monotonic()
        time.sleep(0.5)
    return head, temp_dir, {"address": f"127.0.0.1:{gcs}", "env": env}


@pytest.fixture
def fake_cluster(tmp_path: Path) -> Iterator[dict[str, Any]]:
    """A head of its own on Ray's fake multi-node provider with clusters/local-fake.yaml: 0 CPUs on the
    head, CPU worker nodes added on demand. Own temp dir and ports (REFERENCE.md table, row G)."""
    config = _load("local-fake.yaml")
    errors = []
    for _ in range(5):  # the head's raylet can lose the race with its agent (see _start_head)
        try:
            head, temp_dir, cluster = _start_head(config, tmp_path)
            break
        except RuntimeError as exc:
            errors.append(str(exc))
    else:
        pytest.fail("\n\n".join(errors))
    cluster["temp_dir"], cluster["head"] = temp_dir, head
    try:
        yield cluster
    finally:
        _stop(head, temp_dir)
        left = _processes_under(temp_dir)
        # Keep the logs with the test's tmp_path (pytest keeps the last three), drop the rest.
        shutil.copytree(Path(temp_dir) / "session_latest" / "logs", tmp_path / "ray-logs",
                        ignore=shutil.ignore_patterns("old", "events", "export_events"), dirs_exist_ok=True)
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not left, f"processes of the fake cluster outlived the test: {left}"


def _nodes(address: str, env: dict[str, str]) -> list[dict[str, Any]]:
    """`ray.nodes()` (dead nodes included) from a driver of its own: the test process keeps its Ray
    state for the session's embedded cluster."""
    code = ("import json, ray; ray.init(address=%r, log_to_driver=False); "
            "print(json.dumps([{k: n[k] for k in ('NodeID', 'Alive', 'Resources')} for n in ray.nodes()]))")
    out = subprocess.run([sys.executable, "-c", code % address], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _run_job(args: list[str], cluster: dict[str, Any], *, timeout: float) -> str:
    """Runs a job against the cluster; fails at once, with the head's logs, if the head goes down."""
    with tempfile.TemporaryFile("w+") as log:
        job = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=cluster["env"], stdout=log,
                               stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + timeout
        while job.poll() is None:
            if cluster["head"].poll() is not None or time.monotonic() > deadline:
                job.kill()
                job.wait()
                log.seek(0)
                pytest.fail(f"head alive: {cluster['head'].poll() is None}; job output:\n{log.read()[-3000:]}\n"
                            f"raylet.out:\n{_logs(cluster['temp_dir'], 'raylet.out')}")
            time.sleep(1)
        log.seek(0)
        output = log.read()
    assert job.returncode == 0, output[-4000:]
    return output


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_fake_cluster_adds_nodes_for_a_training_job(tmp_path: Path, fake_cluster: dict[str, Any]) -> None:
    """The head has no CPU, so every ingest task, Ray Data task and Ray Train worker (1 CPU each)
    needs a node the autoscaler adds: the job can only finish if it added them."""
    from ray.autoscaler._private.fake_multi_node.node_provider import FAKE_HEAD_NODE_ID

    address, runs = fake_cluster["address"], tmp_path / "runs"
    _run_job(["jobs/train.py", "--config", "jobs/configs/train_smoke.yaml",
              "--set", f"ray.address={address}", "--set", "ray.num_cpus=null",
              "--set", "train.cpus_per_worker=1", "--set", f"train.storage_path={runs}",
              "--set", f"data.output={tmp_path / 'data' / 'smoke'}", "--set", "train.metrics_port=0",
              "--set", "loss.lambda_irm=0"],  # plain MAE: no teacher run, the scaling mechanics in half the time
             fake_cluster, timeout=900)
    assert (runs / "facemae-synthetic-smoke" / "checkpoint_00000006" / "latest").is_file()

    nodes = _nodes(address, fake_cluster["env"])
    head = [n for n in nodes if n["NodeID"] == FAKE_HEAD_NODE_ID]
    added = [n for n in nodes if n not in head]
    assert len(head) == 1 and head[0]["Resources"].get("CPU", 0) == 0, nodes
    # Dead nodes are listed too (an added node idle for idle_timeout_minutes is removed, even mid-job),
    # with their resources cleared; the live ones show the node type's CPUs.
    assert any(n["Alive"] and n["Resources"].get("CPU", 0) >= 1 for n in added), nodes
    logs = Path(fake_cluster["temp_dir"]) / "session_latest" / "logs"
    # Ray Train's structured logs name the node each training worker ran on: added nodes only.
    worker_nodes = {json.loads(line)["node_id"] for path in (logs / "train").glob("ray-train-sys-worker-*.log")
                    for line in path.read_text().splitlines()}
    assert worker_nodes and worker_nodes <= {n["NodeID"] for n in added}, (worker_nodes, nodes)
    # The autoscaler launched them and saw them come up ("Active:" in its status); the latter needs
    # provider.use_node_id_as_ip, as all fake nodes share one IP.
    monitor_log = (logs / "monitor.log").read_text()
    assert re.search(r"Adding \d+ node\(s\) of type ray\.worker\.cpu\.", monitor_log), monitor_log[-3000:]
    assert re.search(r"Active:\n(?: .*\n)*? +\d+ ray\.worker\.cpu\n", monitor_log), monitor_log[-3000:]
