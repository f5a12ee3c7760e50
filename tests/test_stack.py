"""The team stack (`mlnb.stack`, `mlnb stack up/down/status`): PostgreSQL, an MLflow server on it and a Dask cluster, real
processes on 127.0.0.1. Most tests use the session's `team_stack` (conftest); the CLI and failure tests start their own."""
import json, os, re, subprocess, time
from pathlib import Path
import pytest

from conftest import MLNB

pytestmark = pytest.mark.slow


def gone(pid):
    "Has process `pid` exited (a zombie counts as exited)?"
    import psutil
    try: return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess: return True


def mlnb(*args, cwd, timeout=300):
    env = {k: v for k, v in os.environ.items() if k != "MLNB_PROJECT"}
    return subprocess.run([*MLNB, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


def test_the_stack_records_itself_and_its_settings(team_stack):
    rec = json.loads((team_stack.folder / "stack.json").read_text())
    assert rec["settings"] == team_stack.settings
    assert team_stack.settings == {"tracking_uri": team_stack.mlflow_uri, "audit_log": team_stack.pg.url("mlnb_audit"),
                                   "executor": "dask", "dask_scheduler": team_stack.scheduler}
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+", team_stack.mlflow_uri)
    assert re.fullmatch(r"tcp://127\.0\.0\.1:\d+", team_stack.scheduler)
    assert re.fullmatch(r"postgresql://mlnb@127\.0\.0\.1:\d+/mlnb_audit", team_stack.settings["audit_log"])
    print(f"team stack started in {team_stack.seconds:.1f} s")
    from mlnb.stack import Stack, StackError
    with pytest.raises(StackError, match="a stack is already running in .*mlnb stack down --dir"):
        Stack(team_stack.folder).up()
    st = Stack.status(team_stack.folder)
    assert st["running"] and st["parts"]["mlflow"]["healthy"] and st["parts"]["dask"]["connected"] == ["worker-1", "worker-2"]


def test_status_answers_while_the_cluster_works(team_stack):
    """A worker that finished tasks since its last heartbeat reports metrics the scheduler's /json/identity.json cannot
    write (it answers 500 until the next heartbeat): the status asks the scheduler over its comm, so it names the workers
    while they work too."""
    import operator
    from distributed import Client
    from mlnb.stack import Stack
    seen = []
    with Client(team_stack.scheduler, timeout=60) as c:
        for i in range(12):  # tasks finish before each look, over several heartbeats
            assert c.gather(c.map(operator.add, range(8), [i] * 8, pure=False)) == [n + i for n in range(8)]
            seen.append(Stack.status(team_stack.folder)["parts"]["dask"]["connected"])
            time.sleep(0.25)
    assert seen == [["worker-1", "worker-2"]] * 12, seen


def test_postgres_takes_a_connection_and_a_write(team_stack):
    import psycopg
    url = team_stack.pg.create_database("stack_test")
    assert url == team_stack.pg.create_database("stack_test") == team_stack.pg.url("stack_test")  # idempotent
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE TABLE notes (id serial PRIMARY KEY, body text NOT NULL)")
        conn.execute("INSERT INTO notes (body) VALUES (%s)", ("written",))
    with psycopg.connect(url) as conn:  # another connection reads it back
        assert conn.execute("SELECT body FROM notes").fetchall() == [("written",)]
        assert conn.execute("SHOW listen_addresses").fetchone() == ("127.0.0.1",)
    with psycopg.connect(team_stack.settings["audit_log"]) as conn:
        assert conn.execute("SELECT current_database()").fetchone() == ("mlnb_audit",)
    if os.geteuid() == 0:  # root: the OS user postgres runs it, on data in a temporary folder it owns
        import pwd
        temp = Path(json.loads((team_stack.folder / "stack.json").read_text())["postgres"]["temp"])
        assert temp.is_dir() and temp.stat().st_uid == pwd.getpwnam("postgres").pw_uid


def test_mlflow_server_keeps_runs_in_postgres_and_artifacts_under_the_stack(team_stack, tmp_path):
    import psycopg
    from mlflow import MlflowClient
    client = MlflowClient(tracking_uri=team_stack.mlflow_uri)
    exp = client.create_experiment(f"stack-test-{os.getpid()}-{time.time_ns()}")
    run = client.create_run(exp)
    rid = run.info.run_id
    assert run.info.artifact_uri.startswith("mlflow-artifacts:/")  # proxied: a client on another machine uploads over HTTP
    client.log_metric(rid, "rmse", 0.25)
    client.log_text(rid, "from a client", "notes/hello.txt")
    client.set_terminated(rid)
    with psycopg.connect(team_stack.pg.url("mlflow")) as conn:
        assert conn.execute("SELECT status FROM runs WHERE run_uuid = %s", (rid,)).fetchone() == ("FINISHED",)
        assert conn.execute("SELECT value FROM metrics WHERE run_uuid = %s AND key = 'rmse'", (rid,)).fetchall() == [(0.25,)]
    stored = list((team_stack.folder / "mlflow" / "artifacts").rglob("hello.txt"))
    assert len(stored) == 1 and rid in str(stored[0]) and stored[0].read_text() == "from a client"
    back = client.download_artifacts(rid, "notes/hello.txt", str(tmp_path))
    assert Path(back).read_text() == "from a client"


def test_dask_cluster_runs_a_task_on_each_worker(team_stack):
    from distributed import Client
    with Client(team_stack.scheduler, timeout=30) as c:
        by_name = {w["name"]: addr for addr, w in c.scheduler_info(n_workers=-1)["workers"].items()}
        assert sorted(by_name) == sorted(n for n, _ in team_stack.cluster.workers) == ["worker-1", "worker-2"]
        for name, pid in team_stack.cluster.workers:  # no nanny: the pid the stack recorded is the process that runs tasks
            assert c.submit(os.getpid, workers=[by_name[name]], pure=False).result(timeout=60) == pid


def test_kill_worker_mid_task_leaves_the_other(tmp_path):
    "On a cluster of its own, so that the session's keeps both workers."
    from distributed import Client
    from mlnb.stack import DaskCluster
    started = tmp_path / "started"
    cluster = DaskCluster(tmp_path / "dask", workers=2).start()
    try:
        pids = dict(cluster.workers)
        with Client(cluster.address, timeout=30) as c:
            addr = {w["name"]: a for a, w in c.scheduler_info(n_workers=-1)["workers"].items()}
            def task(path):  # nested: cloudpickle sends it by value
                import os, time
                if not os.path.exists(path): open(path, "w").write(str(os.getpid())); time.sleep(60)
                return os.getpid()
            fut = c.submit(task, str(started), workers=[addr["worker-2"]], allow_other_workers=True, pure=False)
            end = time.time() + 60
            while not started.exists() and time.time() < end: time.sleep(0.1)
            assert started.read_text() == str(pids["worker-2"]), "the task runs on worker-2"
            assert cluster.kill_worker("worker-2") == pids["worker-2"] and gone(pids["worker-2"])
            assert cluster.connected() == ["worker-1"] and [n for n, _ in cluster.workers] == ["worker-1"]
            assert fut.result(timeout=60) == pids["worker-1"], "the scheduler gave the task to the worker left"
        name, pid = cluster.add_worker("worker-2")  # a worker of the same name may join again
        assert name == "worker-2" and cluster.connected() == ["worker-1", "worker-2"]
    finally:
        every = [cluster.pid, *(p for _, p in cluster.workers)]
        cluster.stop()
    assert all(gone(p) for p in every)


def test_cli_up_status_down_leaves_no_process(tmp_path):
    import psutil
    d = tmp_path / "stack"
    t0 = time.time()
    up = mlnb("stack", "up", "--dir", str(d), "--workers", "1", cwd=tmp_path)
    assert up.returncode == 0, up.stderr
    print(f"`mlnb stack up --workers 1` took {time.time() - t0:.1f} s")
    assert "starting PostgreSQL" in up.stderr and "MLflow server http://127.0.0.1:" in up.stderr  # progress on stderr
    rec = json.loads((d / "stack.json").read_text())
    settings = rec["settings"]
    assert set(settings) == {"tracking_uri", "audit_log", "executor", "dask_scheduler"}
    for k, v in settings.items():  # the lines to paste, both ways
        assert f"  {k} = {v}\n" in up.stdout and f"  export MLNB_{k.upper()}={v}\n" in up.stdout
    assert f"mlnb stack down --dir {d}" in up.stdout
    main = [rec["postgres"]["pid"], rec["mlflow"]["pid"], rec["dask"]["pid"], *(p for _, p in rec["dask"]["workers"])]
    assert len(main) == 4 and [n for n, _ in rec["dask"]["workers"]] == ["worker-1"]
    procs = [psutil.Process(p) for p in main]
    every = procs + [c for p in procs for c in p.children(recursive=True)]  # uvicorn, postgres's own processes
    assert all(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in every), "they outlive `mlnb stack up`"

    st = mlnb("stack", "status", "--dir", str(d), "--json", cwd=tmp_path)
    assert st.returncode == 0, st.stderr
    st = json.loads(st.stdout)
    assert st["running"] and st["parts"]["mlflow"]["healthy"] and st["parts"]["dask"]["connected"] == ["worker-1"]
    text = mlnb("stack", "status", "--dir", str(d), cwd=tmp_path).stdout
    assert f"team stack in {d}: running" in text and "1 of 1 workers connected: worker-1" in text

    down = mlnb("stack", "down", "--dir", str(d), cwd=tmp_path)
    assert down.returncode == 0, down.stderr
    assert down.stdout.strip() == (f"stopped the team stack in {d}: Dask cluster (stopped), MLflow server (stopped), "
                                   "PostgreSQL (stopped)")
    _, alive = psutil.wait_procs(every, timeout=30)
    assert not alive, f"left running: {alive}"
    assert not (d / "stack.json").exists()
    if rec["postgres"]["temp"]: assert not Path(rec["postgres"]["temp"]).exists(), "root's temporary data folder is removed"
    again = mlnb("stack", "down", "--dir", str(d), cwd=tmp_path)
    assert again.returncode == 0 and "nothing to stop" in again.stdout
    st = mlnb("stack", "status", "--dir", str(d), cwd=tmp_path)
    assert st.returncode == 0 and "no team stack recorded in" in st.stdout


def test_a_part_that_fails_stops_the_parts_started(tmp_path):
    "The MLflow server cannot have its folder (a file is in the way): PostgreSQL, started first, is stopped again."
    from mlnb.stack import Stack, StackError
    d = tmp_path / "stack"
    d.mkdir(); (d / "mlflow").write_text("in the way")
    with pytest.raises(StackError, match=r"cannot start the team stack in .*mlflow.*the parts already started are stopped"):
        Stack(d).up()
    pg = json.loads((d / "postgres" / "postgres.json").read_text())
    assert pg["pid"] and gone(pg["pid"])
    assert not (d / "stack.json").exists() and Stack.status(d)["running"] is False
    if pg["temp"]: assert not Path(pg["temp"]).exists()


def test_the_default_folder_is_the_projects(project, tmp_path_factory):
    "Inside a project, `.mlnb/stack`; elsewhere, ./mlnb-stack (asked of `status`, which starts nothing)."
    p = mlnb("--project", str(project), "stack", "status", cwd=project)
    assert p.returncode == 0 and f"no team stack recorded in {project / '.mlnb' / 'stack'};" in p.stdout, p.stdout + p.stderr
    elsewhere = tmp_path_factory.mktemp("elsewhere")  # not inside the project
    p = mlnb("stack", "status", cwd=elsewhere)
    assert p.returncode == 0 and f"no team stack recorded in {elsewhere / 'mlnb-stack'};" in p.stdout, p.stdout + p.stderr
