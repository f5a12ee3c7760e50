"""The Dask executor against a real cluster on 127.0.0.1 (`dask scheduler` and `dask worker` processes, started by
`mlnb.stack` in the session's `team_stack`): the same cache keys, products, executed notebooks, failures, timeouts, Ctrl-C
and `--resume` as the local executor, and a worker that dies mid-stage named in one line."""
import json, os, signal, subprocess, sys, time
from pathlib import Path
import pytest

from conftest import MLNB, add_stage, free_port, run_json, run_mlnb, statuses, wait_for

pytestmark = pytest.mark.slow


def product(project, rec, stage, name):
    return json.loads((Path(rec["stages"][stage]["entry"]) / f"{name}.json").read_text())


def test_chain_runs_on_the_cluster_with_the_local_executors_keys(chain, team_stack):
    log = team_stack.cluster.folder / "scheduler.log"
    before = log.stat().st_size
    rec = run_json(chain, "run", "--scheduler", team_stack.scheduler)
    said = log.read_text()[before:]  # what the scheduler logged while the run watched its stages: no errors
    assert "variable-mlnb-a-" in said and " ERROR " not in said, said[-3000:]
    assert rec["executor"] == {"dask": team_stack.scheduler}
    assert statuses(rec) == {"a": "done", "b": "done", "c": "done"}
    assert product(chain, rec, "c", "out") == {"y": 7}
    names = {n for n, _ in team_stack.cluster.workers}
    assert {s["worker"] for s in rec["stages"].values()} <= names, "each stage says which worker ran it"
    for n in "abc":  # the executed notebooks, where the local executor puts them, with the stage's own outputs
        nb = json.loads((chain / ".mlnb/runs" / rec["run_id"] / "notebooks" / f"{n}.ipynb").read_text())
        assert any("injected-parameters" in c["metadata"].get("tags", []) for c in nb["cells"])
        entry = Path(rec["stages"][n]["entry"])
        assert not (entry / ".worker.json").exists(), "the executor's bookkeeping is not a product"
    local = run_json(chain, "run")  # the same keys: the local executor reuses what the cluster made
    assert statuses(local) == {"a": "cached", "b": "cached", "c": "cached"}
    # settings instead of the option; a parameter re-keys what it reaches, on the cluster too
    with open(chain / "settings.ini", "a") as f: f.write(f"executor = dask\ndask_scheduler = {team_stack.scheduler}\n")
    again = run_json(chain, "run", "-p", "factor=3")
    assert again["executor"] == {"dask": team_stack.scheduler}
    assert statuses(again) == {"a": "cached", "b": "done", "c": "done"} and product(chain, again, "c", "out") == {"y": 10}
    p = run_mlnb(chain, "run", "--force", check=0)
    assert f"on Dask {team_stack.scheduler}" in p.stderr, p.stderr


def test_a_failed_stage_on_the_cluster_is_one_line_and_resumes(chain, team_stack):
    add_stage(chain, "b", "upstream = ['a']\nfactor = 2", "from mlnb import stage\nx = 1", "raise ValueError('factor is wrong')")
    p = run_mlnb(chain, "run", "--scheduler", team_stack.scheduler, check=1)
    lines = [l for l in p.stderr.splitlines() if l.startswith("mlnb: error")]
    assert len(lines) == 1, p.stderr
    assert ("stage 'b' failed in code cell 3 of b.ipynb, line 1 (the cell starting `raise ValueError('factor is wrong')`): "
            "ValueError: factor is wrong") in lines[0]
    rec = json.loads(next((chain / ".mlnb/runs").glob("*/run.json")).read_text())
    assert statuses(rec) == {"a": "done", "b": "failed", "c": "skipped"}
    nb = json.loads((chain / rec["stages"]["b"]["visible_notebook"]).read_text())  # written by the worker, marked as locally
    assert any("papermill-error-cell-tag" in c["metadata"].get("tags", []) for c in nb["cells"])
    assert not [t for t in (chain / ".mlnb/cache/b").iterdir() if t.name.startswith(".tmp-")], "no private folder left"
    add_stage(chain, "b", "upstream = ['a']\nfactor = 2", "from mlnb import stage\nstage.save('doubled', {'x': stage.load('nums')['n'] * factor})")
    resumed = run_json(chain, "run", "--resume")  # the scheduler is one of the options the run started with
    assert resumed["run_id"] == rec["run_id"] and resumed["executor"] == {"dask": team_stack.scheduler}
    assert statuses(resumed) == {"a": "done", "b": "done", "c": "done"} and product(chain, resumed, "c", "out") == {"y": 7}


def test_timeout_on_the_cluster(project, team_stack):
    add_stage(project, "sleepy", "upstream = []", "import time\ntime.sleep(120)")
    t0 = time.time()
    p = run_mlnb(project, "run", "--scheduler", team_stack.scheduler, "--timeout", "3", check=1)
    assert time.time() - t0 < 60
    assert "stage 'sleepy' failed" in p.stderr and "timeout of 3 s" in p.stderr


def test_ctrl_c_stops_the_stage_on_its_worker(project, team_stack):
    pidfile = project / "kernel.pid"
    add_stage(project, "slow", f"upstream = []\nseconds = 60",
              f"import os, time\nopen({str(pidfile)!r}, 'w').write(str(os.getpid()))\ntime.sleep(seconds)",
              "from mlnb import stage\nstage.save('done', {'ok': True})")
    proc = subprocess.Popen([*MLNB, "--project", str(project), "run", "--scheduler", team_stack.scheduler],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(pidfile.exists, 120, what="the stage to start on a worker")
    time.sleep(1)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    rec = json.loads(next((project / ".mlnb/runs").glob("*/run.json")).read_text())
    assert rec["status"] == "interrupted" and rec["stages"]["slow"]["status"] == "interrupted"
    kernel = int(pidfile.read_text())
    def gone():
        try: os.kill(kernel, 0); return False
        except ProcessLookupError: return True
    wait_for(gone, 30, "the stage's kernel on the worker to stop")
    add_stage(project, "slow", "upstream = []\nseconds = 0", "import time\ntime.sleep(seconds)", "from mlnb import stage\nstage.save('done', {'ok': True})")
    resumed = run_json(project, "run", "--resume", rec["run_id"])
    assert resumed["run_id"] == rec["run_id"] and statuses(resumed) == {"slow": "done"}


def test_a_sweep_on_the_cluster_against_the_tracking_server(project, team_stack):
    "A sweep's trials run on the Dask cluster and land in the team's MLflow server, nested under the sweep's run."
    import uuid
    name = f"sweep-{uuid.uuid4().hex[:8]}"  # the server is the session's: an experiment of this test's own
    ini = project / "settings.ini"
    ini.write_text(ini.read_text().replace("experiment = test", f"experiment = {name}") + f"tracking_uri = {team_stack.mlflow_uri}\n")
    add_stage(project, "data", "upstream = []", "from mlnb import stage\nstage.save('base', {'b': 1})")
    add_stage(project, "train", "upstream = ['data']\np = 1", "from mlnb import stage\nstage.log_metric('score', -(p - 2) ** 2)\nstage.save('m', {'p': p})")
    add_stage(project, "register", "upstream = ['train']", "from mlnb import stage\ndef register(m): return m\nstage.save('chosen', register(stage.load('m')))")
    rec = run_json(project, "run", "--sweep", "p=1:3", "--select", "max:score", "--jobs", "2", "--scheduler", team_stack.scheduler)
    assert [t["status"] for t in rec["trials"]] == ["done"] * 3 and rec["best"] == 2
    assert json.loads((Path(rec["final"]["stages"]["register"]["entry"]) / "chosen.json").read_text()) == {"p": 2}
    names = {n for n, _ in team_stack.cluster.workers}
    for t in rec["trials"]:  # every trial's stages ran on the cluster's workers
        r = json.loads((project / ".mlnb/runs" / t["run_id"] / "run.json").read_text())
        assert r["executor"] == {"dask": team_stack.scheduler} and r["stages"]["train"]["worker"] in names
    import mlflow
    c = mlflow.MlflowClient(team_stack.mlflow_uri)
    exp = c.get_experiment_by_name(name).experiment_id
    sweep = c.get_run(rec["parent_run_id"])
    assert sweep.data.tags["mlnb.kind"] == "sweep" and sweep.data.metrics["best_score"] == 0.0
    kids = {k.data.tags["mlnb.trial"]: k for k in c.search_runs([exp], f"tags.mlflow.parentRunId = '{rec['parent_run_id']}'")}
    assert set(kids) == {"1", "2", "3", "before", "final"} and kids["2"].data.metrics["score"] == 0.0


def _worker(address, name, env):
    "A `dask worker` process (no nanny: its pid is the worker's), waited for until the scheduler has it."
    from distributed import Client
    exe = Path(sys.executable).with_name("dask")
    p = subprocess.Popen([str(exe), "worker", address, "--name", name, "--nthreads", "1", "--no-nanny", "--no-dashboard"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True)
    with Client(address, timeout=30) as c:
        wait_for(lambda: any(w.get("name") == name for w in c.scheduler_info(n_workers=-1)["workers"].values()), 60, f"worker {name}")
    return p


def test_a_worker_that_dies_mid_stage_fails_it_by_name_and_resume_completes(project, tmp_path):
    "On a scheduler of its own, so that the session's cluster keeps both workers: kill -9 the worker running a stage."
    exe = Path(sys.executable).with_name("dask")
    port = free_port(); address = f"tcp://127.0.0.1:{port}"
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}
    sched = subprocess.Popen([str(exe), "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True)
    procs = [sched]
    try:
        first = _worker(address, "doomed", env); procs.append(first)
        flag, started = project / "hang", project / "started"
        flag.touch()
        add_stage(project, "a", "upstream = []", "from mlnb import stage\nstage.save('v', {'v': 1})")
        add_stage(project, "long", "upstream = ['a']",
                  f"import time\nfrom pathlib import Path\nPath({str(started)!r}).touch()\n"
                  f"while Path({str(flag)!r}).exists(): time.sleep(0.2)",
                  "from mlnb import stage\nstage.save('done', {'ok': True})")
        run = subprocess.Popen([*MLNB, "--project", str(project), "run", "--scheduler", address], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
        wait_for(started.exists, 120, what="the long stage to start")
        first.kill(); first.wait()
        out, err = run.communicate(timeout=120)
        assert run.returncode == 1, err
        lines = [l for l in err.splitlines() if l.startswith("mlnb: error")]
        assert len(lines) == 1, err
        assert "stage 'long' failed" in lines[0] and "WorkerDied: Dask worker doomed" in lines[0] and f"pid {first.pid}" in lines[0], lines[0]
        rec = json.loads(next((project / ".mlnb/runs").glob("*/run.json")).read_text())
        assert statuses(rec) == {"a": "done", "long": "failed"}
        flag.unlink()
        procs.append(_worker(address, "second", env))
        resumed = run_json(project, "run", "--resume")
        assert resumed["run_id"] == rec["run_id"] and statuses(resumed) == {"a": "done", "long": "done"}
        assert resumed["stages"]["long"]["worker"] == "second"
    finally:
        for p in procs:
            if p.poll() is None: p.kill(); p.wait()


def test_a_worker_with_another_environment_is_refused(project, tmp_path):
    "A worker whose packages differ would cache products under a key naming the client's environment: the stage fails first."
    exe = Path(sys.executable).with_name("dask")
    port = free_port(); address = f"tcp://127.0.0.1:{port}"
    extra = tmp_path / "site"; (extra / "another_package-1.0.dist-info").mkdir(parents=True)
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}
    procs = [subprocess.Popen([str(exe), "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True)]
    try:
        procs.append(_worker(address, "odd", {**env, "PYTHONPATH": str(extra)}))
        add_stage(project, "a", "upstream = []", "from mlnb import stage\nstage.save('v', {'v': 1})")
        p = run_mlnb(project, "run", "--scheduler", address, check=1)
        assert "stage 'a' failed" in p.stderr and "WorkerEnvironment: Dask worker odd" in p.stderr, p.stderr
        assert "install the same locked stack on the workers" in p.stderr
        assert not (project / ".mlnb/cache/a").exists() or not any((e / "manifest.json").exists() for e in (project / ".mlnb/cache/a").iterdir())
    finally:
        for p in procs:
            if p.poll() is None: p.kill(); p.wait()


def test_an_unreachable_scheduler_is_one_line(project):
    add_stage(project, "a", "upstream = []", "x = 1")
    p = run_mlnb(project, "run", "--scheduler", f"tcp://127.0.0.1:{free_port()}", check=1)
    assert "cannot reach the Dask scheduler at tcp://127.0.0.1:" in p.stderr and "Traceback" not in p.stderr, p.stderr
    with open(project / "settings.ini", "a") as f: f.write("executor = dask\n")
    p = run_mlnb(project, "run", check=1)
    assert "executor = dask needs dask_scheduler = tcp://HOST:PORT" in p.stderr, p.stderr
    p = run_mlnb(project, "run", "--scheduler", "localhost:8786", check=1)
    assert "accepted is an address such as tcp://127.0.0.1:8786" in p.stderr, p.stderr
    rec = run_json(project, "run", "--scheduler", "local")  # here, whatever the settings say (e.g. to resume without the cluster)
    assert rec["executor"] == "local" and statuses(rec) == {"a": "done"}



def _private_mounts() -> list | None:
    "The `unshare` command that gives a process mounts of its own (as root, or in a user namespace), or None where neither works."
    import shutil as sh
    if not sh.which("unshare"): return None
    for cmd in (["unshare", "-m"], ["unshare", "-rm"]):
        if subprocess.run([*cmd, "true"], capture_output=True).returncode == 0: return cmd
    return None


_DRIVER = r'''
import json, os, subprocess, sys
from pathlib import Path
from mlnb.pipeline import write_stage
hidden, store, scheduler, out, team = Path(sys.argv[1]), sys.argv[2], sys.argv[3], Path(sys.argv[4]), json.loads(sys.argv[5])
subprocess.run(["mount", "-t", "tmpfs", "none", str(hidden)], check=True)  # only this process and its children see what is in it
p = hidden / "proj"; (p / "pipeline").mkdir(parents=True)
(p / "settings.ini").write_text(f"[mlnb]\npipeline = pipeline\nexperiment = test\nmodel_name = test-model\nstore = {store}\n")
(p / "data.txt").write_text("5\n")
here = "import os\nassert not os.path.exists(" + repr(str(p / "settings.ini")) + "), 'this kernel sees the client project'\n"
write_stage(p / "pipeline/a.ipynb", "upstream = []\ninputs = ['data.txt']\nn = 3",
            here + "from mlnb import stage\nk = int(open(os.path.join(stage.context()['project'], 'data.txt')).read())\nstage.save('nums', {'n': n + k})")
write_stage(p / "pipeline/b.ipynb", "upstream = ['a']\nfactor = 2", here + "from mlnb import stage\nx = 1", "raise ValueError('factor is wrong')")
write_stage(p / "pipeline/c.ipynb", "upstream = ['b']", here + "from mlnb import stage\nstage.save('out', {'y': stage.load('doubled')['x'] + 1})")
env = {k: v for k, v in os.environ.items() if k != "MLNB_PROJECT"}
mlnb = [sys.executable, "-c", "from mlnb.cli import main; main()", "--project", str(p)]
res = {"seen": (p / "settings.ini").exists()}
r = subprocess.run([*mlnb, "run", "--scheduler", scheduler], capture_output=True, text=True, env=env, cwd=p, timeout=300)
res["sqlite"] = {"code": r.returncode, "stderr": r.stderr}  # MLflow and the audit log in files of the project: not on the workers
with open(p / "settings.ini", "a") as f: f.write(f"tracking_uri = {team['tracking_uri']}\naudit_log = {team['audit_log']}\n")
r = subprocess.run([*mlnb, "run", "--scheduler", scheduler], capture_output=True, text=True, env=env, cwd=p, timeout=300)
res["failed"] = {"code": r.returncode, "stderr": r.stderr}
rec = max((json.loads(f.read_text()) for f in (p / ".mlnb/runs").glob("*/run.json")), key=lambda r: r["started"])
res["failed"]["record"] = rec
res["failed"]["notebook"] = json.loads((p / rec["stages"]["b"]["visible_notebook"]).read_text())
write_stage(p / "pipeline/b.ipynb", "upstream = ['a']\nfactor = 2",
            here + "from mlnb import stage\nstage.save('doubled', {'x': stage.load('nums')['n'] * factor})")
r = subprocess.run([*mlnb, "run", "--resume", "--json"], capture_output=True, text=True, env=env, cwd=p, timeout=300)
res["resumed"] = {"code": r.returncode, "stderr": r.stderr, "record": json.loads(r.stdout) if r.returncode == 0 else None}
if r.returncode == 0: res["out"] = json.loads((Path(res["resumed"]["record"]["stages"]["c"]["entry"]) / "out.json").read_text())
out.write_text(json.dumps(res))
'''


def test_with_a_store_the_workers_never_see_the_project_folder(team_stack, tmp_path):
    """The client runs in mounts of its own, its project on a tmpfs only it sees (for the workers, the folder is empty): every
    stage asserts on its worker that the project is not there, and still gets its notebook, its inputs and its upstream
    products (from the store). A failure leaves its executed notebook here, and `--resume` completes the run."""
    unshare = _private_mounts()
    if unshare is None: pytest.skip("needs `unshare -m` (root) or `unshare -rm` (user namespaces) to hide the project from the workers")
    hidden, store, out = tmp_path / "hidden", tmp_path / "store", tmp_path / "result.json"
    hidden.mkdir()
    (tmp_path / "driver.py").write_text(_DRIVER)
    team = {k: team_stack.settings[k] for k in ("tracking_uri", "audit_log")}
    p = subprocess.run([*unshare, sys.executable, str(tmp_path / "driver.py"), str(hidden), store.as_uri(), team_stack.scheduler, str(out),
                        json.dumps(team)], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    res = json.loads(out.read_text())
    assert res["seen"] and list(hidden.iterdir()) == [], "the client sees its project; nobody else does"
    assert res["sqlite"]["code"] == 1 and "on Dask, stages run on workers that do not have the project folder, where tracking_uri = sqlite:///" in res["sqlite"]["stderr"]
    assert "accepted: an http(s) tracking_uri and a postgresql:// audit_log" in res["sqlite"]["stderr"], res["sqlite"]["stderr"]
    failed = res["failed"]
    assert failed["code"] == 1, failed["stderr"]
    lines = [l for l in failed["stderr"].splitlines() if l.startswith("mlnb: error")]
    assert len(lines) == 1 and "stage 'b' failed in code cell 3 of b.ipynb, line 1" in lines[0] and "ValueError: factor is wrong" in lines[0], failed["stderr"]
    rec = failed["record"]
    assert statuses(rec) == {"a": "done", "b": "failed", "c": "skipped"}, rec
    assert rec["stages"]["a"]["worker"] in {n for n, _ in team_stack.cluster.workers}
    assert any("papermill-error-cell-tag" in c["metadata"].get("tags", []) for c in failed["notebook"]["cells"]), "the failure's notebook came back"
    assert (store / "runs" / rec["run_id"] / "notebooks" / "b.ipynb").is_file()
    resumed = res["resumed"]
    assert resumed["code"] == 0, resumed["stderr"]
    assert resumed["record"]["run_id"] == rec["run_id"] and statuses(resumed["record"]) == {"a": "done", "b": "done", "c": "done"}
    assert res["out"] == {"y": 17}, "a's input file and upstream products reached the workers"
    for n, s in resumed["record"]["stages"].items():
        assert (store / "cache" / n / s["key"] / "manifest.json").is_file(), f"{n}: its entry is in the store"
