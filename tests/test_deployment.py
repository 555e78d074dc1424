"""`prefect deployment run synth-ood/tiny` against a real local Prefect server and process worker."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from ood_core.pipeline import read_run_record
from ood_core.stages import STAGE_ORDER

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    home = tmp_path_factory.mktemp("prefect-server")
    port = _free_port()
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(home / "results"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_WORKER_QUERY_SECONDS": "1",
        # the scheduler visits deployments every 60 s by default; a short loop keeps the test short
        "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "2",
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "PWD": str(ROOT),
    }
    log = open(home / "server.log", "w")
    proc = subprocess.Popen(
        [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2)
            break
        except OSError:
            time.sleep(1)
    else:
        proc.kill()
        raise RuntimeError(f"Prefect server did not become healthy; see {home / 'server.log'}")
    yield env
    proc.terminate()
    proc.wait(timeout=30)


def prefect(env: dict, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [str(BIN / "prefect"), *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, f"prefect {' '.join(args)}:\n{proc.stdout}\n{proc.stderr}"
    return proc


def test_deployment_run_completes_and_a_second_run_reuses_everything(server, tmp_path):
    env = server
    # as the README says: one script creates both pools from their templates and deploys everything
    proc = subprocess.run(["deploy/deploy.sh"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"deploy/deploy.sh:\n{proc.stdout}\n{proc.stderr}"
    assert "CUDA_VISIBLE_DEVICES" in prefect(env, "work-pool", "inspect", "gpu-pool").stdout  # the template applied
    for name in ("imagenet", "food101", "tiny"):
        prefect(env, "deployment", "inspect", f"synth-ood/{name}")
    worker_log = open(tmp_path / "worker.log", "w")
    worker = subprocess.Popen(
        [str(BIN / "prefect"), "worker", "start", "--pool", "cpu-pool"],
        env=env, cwd=ROOT, stdout=worker_log, stderr=subprocess.STDOUT,
    )
    out = tmp_path / "out"
    params = [
        "-p", f"out={out}",
        "-p", "overrides=" + json.dumps({"models.cache_dir": str(tmp_path / "models")}),
    ]
    try:
        prefect(env, "deployment", "run", "synth-ood/tiny", *params, "--watch", timeout=900)
        keys = read_run_record(str(out))["keys"]
        for stage in STAGE_ORDER:
            assert (out / stage / keys[stage] / "_SUCCESS.json").exists()
        files = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and "_runs" not in p.parts}

        prefect(env, "deployment", "run", "synth-ood/tiny", *params, "--watch", timeout=900)
        assert {p: p.stat().st_mtime_ns for p in files} == files
    finally:
        worker.terminate()
        worker.wait(timeout=30)
    verify = subprocess.run([str(BIN / "synth-ood"), "verify", str(out)], capture_output=True, text=True)
    assert verify.returncode == 0, verify.stdout
    # the server's scheduler works (SQLAlchemy 2.1 made it fail with a bulk_dml error)
    assert "bulk_dml" not in (Path(env["PREFECT_HOME"]) / "server.log").read_text()


def _api(env: dict, path: str, body: dict | None = None) -> object:
    req = urllib.request.Request(
        env["PREFECT_API_URL"] + path,
        data=json.dumps(body).encode() if body is not None else None,
        headers={"Content-Type": "application/json"},
        method="POST" if body is not None else "GET",
    )
    # a server busy with several workers on 2 cores can be slow to answer: retry a timed-out read
    for attempt in range(3):
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                return json.loads(resp.read())
        except TimeoutError:
            if attempt == 2:
                raise
            time.sleep(5)


def test_short_interval_schedule_creates_a_run_that_completes(server, tmp_path):
    """The server's scheduler creates runs (it did not with SQLAlchemy 2.1) and the deployment is limited to one."""
    env = server
    subprocess.run([str(BIN / "prefect"), "work-pool", "create", "cpu-pool", "--type", "process"],
                   env=env, cwd=ROOT, capture_output=True, timeout=120)  # may exist from the test above
    out = tmp_path / "out"
    params = {"out": str(out), "only": ["sketch"], "overrides": {"models.cache_dir": str(tmp_path / "models")}}
    prefect(env, "--no-prompt", "deploy", "--prefect-file", "deploy/prefect.yaml", "--name", "tiny",
            "--interval", "30", "--params", json.dumps(params))
    deployment = _api(env, "/deployments/name/synth-ood/tiny")
    assert deployment["global_concurrency_limit"]["limit"] == 1  # from deploy/prefect.yaml
    assert deployment["concurrency_options"]["collision_strategy"] == "ENQUEUE"
    worker_log = open(tmp_path / "worker.log", "w")
    worker = subprocess.Popen(
        [str(BIN / "prefect"), "worker", "start", "--pool", "cpu-pool"],
        env=env, cwd=ROOT, stdout=worker_log, stderr=subprocess.STDOUT,
    )
    query = {"flow_runs": {"deployment_id": {"any_": [deployment["id"]]}}}
    try:
        deadline, states = time.time() + 1500, []  # generous: a busy 2-core machine took over 10 min
        while time.time() < deadline:
            try:
                states = [r["state_type"] for r in _api(env, "/flow_runs/filter", query) if r["auto_scheduled"]]
            except OSError:  # a busy server may not answer within 30 s; ask again
                pass
            if "COMPLETED" in states or {"FAILED", "CRASHED"} & set(states):
                break
            time.sleep(2)
        assert "COMPLETED" in states, f"no scheduled run completed: {states}; see {tmp_path / 'worker.log'}"
        server_log = (Path(env["PREFECT_HOME"]) / "server.log").read_text()
        assert "bulk_dml" not in server_log
    finally:
        # the schedule would keep creating runs: remove it with the deployment, then stop our worker
        subprocess.run([str(BIN / "prefect"), "deployment", "delete", "synth-ood/tiny"],
                       env=env, cwd=ROOT, capture_output=True, timeout=120)
        worker.terminate()
        worker.wait(timeout=30)
    assert (out / "sketch").is_dir()


@pytest.mark.e2e
def test_fan_out_spreads_chunks_over_two_workers_on_an_s3_root(server, s3_bucket, tmp_path):
    """Generate / elaborate / finetune run as chunk runs of synth-ood-shards/tiny-shards on two workers."""
    import uuid

    from ood_core.storage import StageStore

    env = {**server, "FSSPEC_S3": os.environ["FSSPEC_S3"], "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_EC2_METADATA_DISABLED": "true"}
    subprocess.run([str(BIN / "prefect"), "work-pool", "create", "cpu-pool", "--type", "process"],
                   env=env, cwd=ROOT, capture_output=True, timeout=120)  # may exist from a test above
    prefect(env, "--no-prompt", "deploy", "--prefect-file", "deploy/prefect.yaml", "--name", "tiny")
    prefect(env, "--no-prompt", "deploy", "--prefect-file", "deploy/prefect.yaml", "--name", "tiny-shards")
    logs = {name: tmp_path / f"{name}.log" for name in ("w1", "w2")}
    workers = [
        # no --limit: runs left scheduled by a deleted deployment keep a worker's slots taken (Prefect 3.8.8)
        subprocess.Popen([str(BIN / "prefect"), "worker", "start", "--pool", "cpu-pool", "--name", name],
                         env=env, cwd=ROOT, stdout=open(log, "w"), stderr=subprocess.STDOUT)
        for name, log in logs.items()
    ]
    root = f"{s3_bucket}/fan-out-{uuid.uuid4().hex[:8]}"
    params = {"out": root, "fan_out": "synth-ood-shards/tiny-shards", "chunk_size": 1, "max_in_flight": 4,
              "overrides": {"models.cache_dir": str(tmp_path / "models")}}
    try:
        prefect(env, "deployment", "run", "synth-ood/tiny", "--params", json.dumps(params), "--watch", timeout=1500)
    finally:
        for w in workers:
            w.terminate()
        for w in workers:
            w.wait(timeout=60)
    shard_deployment = _api(env, "/deployments/name/synth-ood-shards/tiny-shards")
    runs = _api(env, "/flow_runs/filter", {"flow_runs": {"deployment_id": {"any_": [shard_deployment["id"]]}}})
    assert runs and all(r["state_type"] == "COMPLETED" for r in runs), [(r["name"], r["state_type"]) for r in runs]
    # a worker's log also carries the output of the runs it started: count only its own submissions
    submitted = {name: log.read_text() for name, log in logs.items()}
    # two workers may both try to submit one run; the server aborts the second ("Aborted submission")
    by_worker = {name: {r["name"] for r in runs if f"submitting flow run '{r['id']}'" in text
                        and f"Aborted submission of flow run '{r['id']}'" not in text}
                 for name, text in submitted.items()}
    print("chunk runs per worker:", json.dumps({k: sorted(v) for k, v in by_worker.items()}, indent=1))
    assert by_worker["w1"] and by_worker["w2"], "both workers ran chunks"
    for stage in ("generate", "elaborate"):
        assert any(n.startswith(stage) and not n.endswith("finalize") for n in by_worker["w1"] | by_worker["w2"])
    keys = read_run_record(root)["keys"]
    for stage in STAGE_ORDER:
        assert StageStore(root, stage, keys[stage]).is_complete()
    # artifacts are keyed by stage and output root, so runs on other roots never overwrite them
    from tasks.stage_tasks import artifact_key

    arts = _api(env, "/artifacts/filter", {"artifacts": {"key": {"any_": [artifact_key("finetune", root)]}}})
    assert arts and "FPR95" in arts[0]["data"] and "base64" not in arts[0]["data"]
    verify = subprocess.run([str(BIN / "synth-ood"), "verify", root], capture_output=True, text=True, env=env)
    assert verify.returncode == 0, verify.stdout + verify.stderr


def _descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (read from /proc), children first found first."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a worker's process group and every process below it (a flow run may have its own session)."""
    import signal

    pids = _descendants(proc.pid)  # before the kill: orphans are re-parented to init
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=30)


def _s3_files(root: str) -> dict[str, tuple]:
    """``{path: (LastModified, ETag)}`` of every object under ``root`` but the run records."""
    import fsspec

    fs, base = fsspec.core.url_to_fs(root)
    fs.invalidate_cache()
    return {p: (str(i.get("LastModified")), i.get("ETag")) for p, i in fs.find(base, detail=True).items()
            if "/_runs/" not in p}


@pytest.mark.e2e
def test_a_worker_killed_in_the_middle_of_generate_loses_nothing_and_rewrites_nothing(server, s3_bucket, tmp_path):
    """As on a GPU pool: the parent on `cpu-pool`, chunks on their own pool. SIGKILL the chunk worker in
    the middle of generate; the parent sees the chunk's heartbeats stop, marks it Crashed and submits it
    again (a fresh worker takes it); a rerun completes, `verify` passes and no object that existed at
    the kill is written again."""
    import uuid

    from ood_core.pipeline import read_plan
    from ood_core.storage import StageStore

    env = {**server, "FSSPEC_S3": os.environ["FSSPEC_S3"], "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_EC2_METADATA_DISABLED": "true",
           "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "30"}  # the shortest Prefect allows
    for pool in ("cpu-pool", "chunk-pool"):
        subprocess.run([str(BIN / "prefect"), "work-pool", "create", pool, "--type", "process"],
                       env=env, cwd=ROOT, capture_output=True, timeout=120)  # cpu-pool may exist already
    prefect(env, "--no-prompt", "deploy", "--prefect-file", "deploy/prefect.yaml", "--name", "tiny")
    # the chunks on a pool of their own (gpu-pool in production), so only `victim` can hold them
    prefect(env, "--no-prompt", "deploy", "--prefect-file", "deploy/prefect.yaml", "--name", "tiny-shards",
            "--pool", "chunk-pool")
    parent_deployment = _api(env, "/deployments/name/synth-ood/tiny")
    shard_deployment = _api(env, "/deployments/name/synth-ood-shards/tiny-shards")
    logs = {name: tmp_path / f"{name}.log" for name in ("parent", "victim", "spare")}

    def start_worker(name: str, pool: str) -> subprocess.Popen:
        return subprocess.Popen(
            [str(BIN / "prefect"), "worker", "start", "--pool", pool, "--name", name],
            env=env, cwd=ROOT, stdout=open(logs[name], "w"), stderr=subprocess.STDOUT, start_new_session=True,
        )

    earlier: set[str] = set()

    def chunk_runs() -> list[dict]:
        query = {"flow_runs": {"deployment_id": {"any_": [shard_deployment["id"]]}}}
        return [r for r in _api(env, "/flow_runs/filter", query) if r["id"] not in earlier]

    earlier = {r["id"] for r in chunk_runs()}  # chunk runs of the tests above
    root = f"{s3_bucket}/kill-{uuid.uuid4().hex[:8]}"
    params = {"out": root, "fan_out": "synth-ood-shards/tiny-shards", "chunk_size": 1, "max_in_flight": 2,
              "stale_after": 45, "overrides": {"models.cache_dir": str(tmp_path / "models")}}
    workers = {"parent": start_worker("parent", "cpu-pool"), "victim": start_worker("victim", "chunk-pool")}
    snapshot: dict = {}
    try:
        parent = _api(env, f"/deployments/{parent_deployment['id']}/create_flow_run", {"parameters": params})
        deadline = time.time() + 1200

        # 1. wait for the middle of generate: a shard done, one not, and a generate chunk running
        victim_chunk = None
        while victim_chunk is None:
            assert time.time() < deadline, f"never caught the middle of generate; see {logs['victim']}"
            state = _api(env, f"/flow_runs/{parent['id']}")["state_type"]
            assert state in ("SCHEDULED", "PENDING", "RUNNING"), f"the parent run ended ({state}) before the kill"
            time.sleep(1)
            record = read_run_record(root)
            store = StageStore(root, "generate", record["keys"]["generate"]) if record else None
            plan = read_plan(store) if store else None
            if not plan:
                continue
            store.fs.invalidate_cache()
            done = [i for i in range(plan["shards"]) if store.shard_done(i)]
            if not done or len(done) == plan["shards"]:
                continue
            running = [r for r in chunk_runs() if r["name"].startswith("generate-") and r["state_type"] == "RUNNING"]
            victim_chunk = running[0] if running else None
        # 2. SIGKILL the chunk worker's process group and the chunk runs it started; a fresh worker joins
        snapshot = _s3_files(root)
        _kill_tree(workers.pop("victim"))
        # a shard without its marker may be half written (e.g. its tar): it is rightly written again
        for i in range(plan["shards"]):
            paths = {**store.shard_paths(i), "rejected": store.rejected_path(i)}
            if paths["stats"] not in snapshot:
                for path in paths.values():
                    snapshot.pop(path, None)
        assert any(store.shard_paths(i)["stats"] in snapshot for i in done)
        print(f"killed `victim` running {victim_chunk['name']}; {len(done)}/{plan['shards']} generate shards done")
        workers["spare"] = start_worker("spare", "chunk-pool")

        # 3. the parent marks the silent chunk Crashed, submits it again and completes
        while (parent_state := _api(env, f"/flow_runs/{parent['id']}")["state_type"]) not in (
                "COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
            assert time.time() < deadline + 1800, "the parent run never finished after the kill"
            time.sleep(2)
        assert parent_state == "COMPLETED", f"parent ended {parent_state}; see {logs['parent']}"
        runs = {r["name"]: r for r in chunk_runs()}
        assert runs[victim_chunk["name"]]["state_type"] == "CRASHED"
        assert runs[victim_chunk["name"] + "-resubmit1"]["state_type"] == "COMPLETED"

        # 4. the deployment run again: everything reused
        prefect(env, "deployment", "run", "synth-ood/tiny", "--params", json.dumps(params), "--watch",
                timeout=900)
    finally:
        for w in workers.values():
            _kill_tree(w)
    after = _s3_files(root)
    rewritten = [p for p, meta in snapshot.items() if after.get(p) != meta]
    assert not rewritten, f"objects written again after the kill: {rewritten[:5]}"
    keys = read_run_record(root)["keys"]
    for stage in STAGE_ORDER:
        assert StageStore(root, stage, keys[stage]).is_complete()
    verify = subprocess.run([str(BIN / "synth-ood"), "verify", root], capture_output=True, text=True, env=env)
    assert verify.returncode == 0, verify.stdout + verify.stderr


def test_a_gpu_limit_runs_one_chunk_at_a_time_per_gpu(server, tmp_path):
    """$SYNTH_OOD_GPU_LIMIT names a global concurrency limit (server-side): two holders never overlap."""
    env = {**server, "SYNTH_OOD_GPU_LIMIT": "gpu-test-0"}
    script = (
        "import sys, time\n"
        "from flows.shards import gpu_slot\n"
        "with gpu_slot():\n"
        "    start = time.time(); time.sleep(2)\n"
        "    open(sys.argv[1], 'w').write(f'{start} {time.time()}')\n"
    )
    missing = subprocess.run([sys.executable, "-c", script, str(tmp_path / "x")], env=env, cwd=ROOT,
                             capture_output=True, text=True, timeout=300)
    assert missing.returncode != 0 and "gpu-test-0" in missing.stderr  # no such limit: an error, not unbounded
    prefect(env, "global-concurrency-limit", "create", "gpu-test-0", "--limit", "1")
    procs = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path / f"run{i}")], env=env, cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    try:
        for p in procs:
            assert p.wait(timeout=300) == 0, p.stdout.read()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    (a0, a1), (b0, b1) = sorted(tuple(map(float, (tmp_path / f"run{i}").read_text().split())) for i in range(2))
    assert a1 <= b0, "the two holders of one GPU's slot overlapped"
