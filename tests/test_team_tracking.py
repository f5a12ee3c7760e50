"""A shared MLflow tracking server on PostgreSQL (the session's `team_stack`) for every command: the reference pipeline on
the Dask cluster, registry commands, build and serve (the service follows the server's aliases), monitoring and governance
views; two pipelines promoting at once, and many processes moving aliases at once, leave a consistent registry."""
import json, os, shutil, subprocess, sys, time, uuid
import pytest

from conftest import MLNB, Served, git, reference_project, run_json, run_mlnb, statuses, wait_for

pytestmark = pytest.mark.slow

RECORD = {"amount": 120.5, "hour": 3, "distance_km": 40.0, "n_tx_24h": 5, "account_age_days": 30, "usual_amount": 35.0,
          "merchant_category": "electronics", "channel": "online", "region": "north", "age_band": "18-25"}


def unique(prefix):
    "A name no other test (or earlier session) on the shared server uses."
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def client(uri):
    from mlflow import MlflowClient
    return MlflowClient(uri, uri)


NO_MLFLOW = ("import sys; from mlnb.cli import main\n"
             "try: main(sys.argv[1:])\n"
             "except SystemExit as e: assert not e.code, e.code\n"
             "assert 'mlflow' not in sys.modules, 'imported mlflow'")


def without_mlflow(project, env, *args):
    "Run an mlnb command in a process that must not import mlflow (it talks to the server's REST API itself); its stdout."
    p = subprocess.run([sys.executable, "-c", NO_MLFLOW, *args], cwd=project, env={**os.environ, **env}, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, (args, p.stderr[-3000:])
    return p.stdout


def read_back(c, experiment):
    "What MLflow's client returns about an experiment's runs (by stage), without the ids and paths that differ between copies."
    exp = c.get_experiment_by_name(experiment)
    runs = c.search_runs([exp.experiment_id])
    key = {r.info.run_id: r.data.tags.get("mlnb.stage", "pipeline") for r in runs}
    def files(run_id, path=None):
        out = []
        for f in c.list_artifacts(run_id, path): out += files(run_id, f.path) if f.is_dir else [(f.path, f.file_size)]
        return out
    return {key[r.info.run_id]: {"info": (r.info.run_name, r.info.status, r.info.start_time, r.info.end_time, r.info.user_id),
                                 "params": r.data.params, "metrics": r.data.metrics, "files": sorted(files(r.info.run_id)),
                                 "tags": {k: (key[v] if k == "mlflow.parentRunId" else v) for k, v in r.data.tags.items() if k != "mlnb.run_dir"}}
            for r in runs}, exp.tags


@pytest.fixture(scope="module")
def team(tmp_path_factory, team_stack):
    """The reference project against the team's server (its own experiment and model there), run once end to end on the
    Dask cluster: (project, env, run record)."""
    d = reference_project(tmp_path_factory.mktemp("team-ref") / "proj")
    name = unique("team-ref")
    env = {"MLNB_TRACKING_URI": team_stack.mlflow_uri, "MLNB_EXPERIMENT": name, "MLNB_MODEL_NAME": name, "MLNB_RELOAD_INTERVAL": "0.5"}
    rec = run_json(d, "run", "--scheduler", team_stack.scheduler, env=env, timeout=900)
    return d, env, rec


def test_reference_pipeline_on_dask_against_the_server(team, team_stack):
    d, env, rec = team
    assert rec["executor"] == {"dask": team_stack.scheduler} and set(statuses(rec).values()) == {"done"}, statuses(rec)
    assert {s["worker"] for s in rec["stages"].values()} <= {n for n, _ in team_stack.cluster.workers}
    c, name = client(team_stack.mlflow_uri), env["MLNB_MODEL_NAME"]
    # the run is on the server: a parent run, a nested run per stage, the executed notebooks uploaded through the server
    exp = c.get_experiment_by_name(env["MLNB_EXPERIMENT"])
    runs = c.search_runs([exp.experiment_id], f"tags.`mlnb.run_id` = '{rec['run_id']}'")
    parent = [r for r in runs if r.data.tags.get("mlnb.kind") == "pipeline"]
    assert len(parent) == 1 and len(runs) == 1 + len(rec["stages"]) and {r.info.status for r in runs} == {"FINISHED"}
    train = next(r for r in runs if r.data.tags.get("mlnb.stage") == "train")
    assert train.data.tags["mlflow.parentRunId"] == parent[0].info.run_id and train.info.artifact_uri.startswith("mlflow-artifacts:")
    assert "notebooks/train.ipynb" in [f.path for f in c.list_artifacts(train.info.run_id, "notebooks")]
    # the registered version, with its lineage, read back by MLflow's own client and by mlnb's commands
    mv = c.get_model_version_by_alias(name, "champion")
    assert mv.version == "1" and mv.tags["mlnb.run_id"] == rec["run_id"] and len(mv.tags["mlnb.model_sha256"]) == 64
    assert mv.tags["mlnb.parent_run_id"] == parent[0].info.run_id
    models = run_json(d, "models", env=env)
    assert [(v["version"], v["aliases"]) for v in models["versions"]] == [(1, ["champion"])]
    assert rec["run_id"] in run_mlnb(d, "status", env=env, check=0).stdout
    run_mlnb(d, "sync", env=env, check=0)  # nothing new: logs nothing twice
    assert len(c.search_runs([exp.experiment_id], f"tags.`mlnb.run_id` = '{rec['run_id']}'")) == len(runs)
    # a fully reused run checks its version and logs itself on the server without importing mlflow, and registers nothing
    again = json.loads(without_mlflow(d, env, "run", "--json"))
    assert set(statuses(again).values()) == {"cached"} and len(json.loads(without_mlflow(d, env, "models", "--json"))["versions"]) == 1
    assert len(c.search_runs([exp.experiment_id], f"tags.`mlnb.run_id` = '{again['run_id']}'")) == 1 + len(rec["stages"])
    # mlnb's own REST calls log a run as MLflow's client does: the same run folder logged both ways reads back the same
    import dataclasses
    from mlnb import tracking
    from mlnb.config import load_config
    run_dir, got = d / ".mlnb" / "runs" / rec["run_id"], {}
    for how in ("rest", "client"):
        cfg = dataclasses.replace(load_config(d), tracking_uri=team_stack.mlflow_uri, experiment=f"{env['MLNB_EXPERIMENT']}-{how}")
        copy = d.parent / f"run-{how}"; shutil.copytree(run_dir, copy); (copy / "tracking.json").unlink()
        assert tracking._rest_runs(cfg)
        tracking.sync_run(cfg, copy, client=how == "client")
        got[how] = read_back(c, cfg.experiment)
    # (the register stage logged its model in a run of its own, in the first experiment: both syncs nest that one)
    assert set(got["rest"][0]) == set(got["client"][0]) == {"pipeline", *rec["stages"]} - {"register"}
    for k in got["client"][0]: assert got["rest"][0][k] == got["client"][0][k], k
    assert got["rest"][1] == got["client"][1]
    # the views read the server: the card logged beside the version, and the lineage down to each stage's notebook
    assert "Card-fraud" in run_mlnb(d, "card", "champion", env=env, check=0).stdout
    lineage = run_mlnb(d, "lineage", "champion", env=env, check=0).stdout
    assert f"pipeline run {rec['run_id']}" in lineage and "register" in lineage


def test_served_champion_follows_the_servers_aliases(team, team_stack):
    d, env, first = team
    built = run_json(d, "build", env=env, timeout=300)
    assert built["version"] == 1
    svc = Served(d, built["tag"], env=env)
    try:
        r = svc.client.post("/predict", json=RECORD)
        assert r.status_code == 200 and r.json()["model_version"] == 1, r.text
        request_id = r.json()["request_id"]
        meta = svc.client.get("/metadata").json()
        assert meta["version"] == 1 and meta["pipeline_run_id"] == first["run_id"]
        # a second candidate from another run (here the local executor) becomes champion on the server: the service switches
        second = run_json(d, "run", "-p", "learning_rate=0.1", env=env, timeout=900)
        assert statuses(second)["register"] == "done"
        version = lambda: svc.client.post("/predict", json=RECORD).json()["model_version"]
        wait_for(lambda: version() == 2, what="the service to serve v2")
        # promotions by hand move what the service answers with
        assert "champion: 2 -> 1" in without_mlflow(d, env, "rollback", "-m", "ops saw alerts")
        wait_for(lambda: version() == 1, what="the service to follow the rollback")
        without_mlflow(d, {**env, "MLNB_ACTOR": "alice"}, "promote", "2", "-m", "fixed")
        wait_for(lambda: version() == 2, what="the service to follow the promotion")
        hist = run_json(d, "models", env=env)["history"]
        assert [(e["from"], e["to"], e["kind"]) for e in hist] == [(None, 1, "promote"), (1, 2, "promote"), (2, 1, "rollback"), (1, 2, "promote")]
        assert hist[-1]["who"] == "alice"
        # an answer's request id leads to the version, its run and its notebooks
        time.sleep(1)  # the prediction log flushes every half second
        assert f"pipeline run {first['run_id']}" in run_mlnb(d, "lineage", request_id, env=env, check=0).stdout
        # monitoring reads the champion's reference from the server and logs its check there
        labels = d / "labels.jsonl"
        run_mlnb(d, "simulate", "--url", svc.url, "--rows", "400", "--drift", "0.8", "--labels", str(labels), env=env, check=0)
        time.sleep(1.5)
        p = run_mlnb(d, "monitor", "--labels", str(labels), "--json", env=env)
        assert p.returncode in (0, 3), p.stderr
        res = json.loads(p.stdout)  # nothing but the JSON on stdout (MLflow prints run links for a server: silenced)
        assert res["report"]["model_version"] == 2
        c = client(team_stack.mlflow_uri)
        mon = c.get_experiment_by_name(env["MLNB_EXPERIMENT"] + "-monitoring")
        checks = c.search_runs([mon.experiment_id])
        assert checks and checks[0].data.tags["mlnb.model_version"] == "2"
        assert {"drift_report.html", "drift_report.json"} <= {f.path for f in c.list_artifacts(checks[0].info.run_id)}
        rep = run_json(d, "report", env=env)["metrics"]
        assert rep["deployments"]["promotions"] == 3 and rep["deployments"]["rollbacks"] == 1
    finally:
        svc.stop()


# --- two pipelines promote at once ----------------------------------------------------------------------------------

def small_project(d, env):
    "A new binary project (scikit-learn's breast cancer), committed; its first run fills its cache and registers v1."
    subprocess.run([*MLNB, "new", str(d), "--task", "binary"], check=True, capture_output=True, env={**os.environ, **env})
    git(d, "init", "-q"); git(d, "add", "-A"); git(d, "commit", "-qm", "new project")
    return d


def test_two_pipelines_promote_at_once_and_the_registry_stays_consistent(tmp_path, team_stack):
    """Two checkouts of one project (two people) train and promote the same model against the server at the same time,
    round after round, with automatic promotion and no regression allowed. Afterwards: every version a run registered is
    there, one version per distinct model (the same model registered from both at once is one version), every promotion
    compared the candidate with the champion it replaced, the history is one unbroken chain, and the champion is the best
    version by the gates' rule."""
    name = unique("team-race")
    env = {"MLNB_TRACKING_URI": team_stack.mlflow_uri, "MLNB_EXPERIMENT": name, "MLNB_MODEL_NAME": name,
           "MLNB_GATE_MAX_REGRESSION": "0", "MLNB_GATE_MIN_RECALL": "0.5"}
    a = small_project(tmp_path / "alice", env)
    run_json(a, "run", "-p", "train.C=0.003", env=env, timeout=900)  # v1, champion (holdout ROC AUC 0.986)
    b = tmp_path / "bob"
    shutil.copytree(a, b, ignore=shutil.ignore_patterns(".mlnb", "runs"))
    shutil.copytree(a / ".mlnb" / "cache", b / ".mlnb" / "cache")  # bob's checkout has run the same upstream stages
    rounds = [("0.01", "0.02"), ("0.05", "0.05")]  # both better than v1 (0.990, 0.993); then the same, better model from both at once
    for ca, cb in rounds:
        procs = [subprocess.Popen([*MLNB, "--project", str(p), "run", "-p", f"train.C={c}", "--json"], cwd=p, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, **env, "MLNB_ACTOR": who})
                 for p, c, who in ((a, ca, "alice"), (b, cb, "bob"))]
        for p in procs:
            out, err = p.communicate(timeout=900)
            assert p.returncode in (0, 1), err  # 1: a candidate the gates refused (no regression allowed)
            assert p.returncode == 0 or "GateFailed" in err, err
    models = run_json(a, "models", env=env)
    versions = {v["version"]: v for v in models["versions"]}
    # every version a run registered (each checkout's audit log says which) is there; one version per distinct model
    registered = [(e["refs"]["version"], e["data"]["model_sha256"]) for p in (a, b) for e in run_json(p, "audit", "--kind", "model.registered", env=env)]
    assert sorted(int(v) for v, _ in registered) == sorted(versions) == list(range(1, 5)), (registered, versions)
    assert all(versions[int(v)]["tags"]["mlnb.model_sha256"] == digest for v, digest in registered)
    assert len({v["tags"]["mlnb.model_sha256"] for v in versions.values()}) == 4
    # the history: numbered without gaps, each move from where the one before left the champion, ending at the champion
    hist = [e for e in models["history"] if e["alias"] == "champion"]
    assert [e["seq"] for e in models["history"]] == list(range(1, len(models["history"]) + 1))
    assert all(x["to"] == y["from"] for x, y in zip(hist, hist[1:])), hist
    champion = next(v for v, x in versions.items() if "champion" in x["aliases"])
    assert hist[-1]["to"] == champion and len(hist) >= 3
    # every promotion was decided against the champion it replaced
    for e in hist[1:]:
        gates = {g["gate"]: g for g in json.loads(versions[e["to"]]["tags"]["mlnb.gates"])}
        assert gates["no_regression"]["against"] == e["from"] and gates["no_regression"]["passed"], (e, gates["no_regression"])
    # the champion is the best version whose other gates passed: no regression (0 allowed) means it beats every earlier one
    auc = lambda v: float(versions[v]["tags"]["holdout.roc_auc"])
    eligible = [v for v, x in versions.items() if all(g["passed"] for g in json.loads(x["tags"]["mlnb.gates"]) if g["gate"] != "no_regression")]
    assert auc(champion) == max(auc(v) for v in eligible), {v: auc(v) for v in eligible}
    assert not [t for t in client(team_stack.mlflow_uri).get_registered_model(name).tags if t.startswith("mlnb.lock.")], "no lock left behind"


ALIAS_MOVER = """
import json, sys
from mlnb.config import load_config
from mlnb import tracking
cfg, i, n, versions = load_config(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), [int(v) for v in sys.argv[4].split(",")]
print(json.dumps([tracking.set_alias(cfg, "champion", versions[(i + k) % len(versions)], f"mover {i} move {k}", kind="promote")["seq"]
                  for k in range(n)]))
"""


def test_alias_moves_from_many_processes_and_a_move_cut_off(tmp_path, team_stack):
    """Four processes move the champion alias of one model six times each, at once, each between two versions of its own
    (so every move changes the alias, however they interleave): every move has its own history record, and each record
    starts where the one before ended. A move cut off between its history record
    and its alias (a killed process) is settled by the next move: kept if the alias moved, dropped if not."""
    from mlnb import tracking
    from mlnb.config import load_config
    name = unique("team-moves")
    env = {"MLNB_TRACKING_URI": team_stack.mlflow_uri, "MLNB_EXPERIMENT": name, "MLNB_MODEL_NAME": name}
    d = tmp_path / "proj"; d.mkdir()
    (d / "settings.ini").write_text("[mlnb]\ntarget = y\n")
    c = client(team_stack.mlflow_uri)
    c.create_registered_model(name)
    exp = c.create_experiment(name)
    for v in range(8):  # versions to move between, two per process (the alias moves do not read the models)
        run = c.create_run(exp).info.run_id
        c.create_model_version(name, source=f"runs:/{run}/model", run_id=run, tags={"mlnb.run_id": f"run{v}"})
    procs = [subprocess.Popen([sys.executable, "-c", ALIAS_MOVER, str(d), str(i), "6", f"{2 * i + 1},{2 * i + 2}"], cwd=d, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, **env, "MLNB_ACTOR": f"mover{i}"})
             for i in range(4)]
    seqs = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
        seqs += json.loads(out)
    os.environ.update(env)
    try:
        cfg = load_config(d)
        hist = tracking.alias_history(cfg)
        assert sorted(seqs) == [e["seq"] for e in hist] == list(range(1, 25)), (seqs, hist)
        assert all(x["to"] == y["from"] for x, y in zip(hist, hist[1:])), hist
        assert int(c.get_model_version_by_alias(name, "champion").version) == hist[-1]["to"]
        # a move cut off after its alias moved (kept), and one cut off before (dropped): as a killed process leaves them
        champ, n = hist[-1]["to"], len(hist)
        other = 1 if champ != 1 else 2
        event = lambda seq, frm, to: json.dumps({"seq": seq, "alias": "champion", "from": frm, "to": to, "kind": "promote",
                                                 "who": "killed", "when": time.time(), "why": "cut off", "pending": True})
        c.set_registered_model_tag(name, f"{tracking.HISTORY}{n + 1:06d}", event(n + 1, champ, other))
        c.set_registered_model_alias(name, "champion", str(other))  # the alias moved, the process died before settling
        assert len(tracking.alias_history(cfg)) == n, "a pending record is not history yet"
        c.set_registered_model_tag(name, f"{tracking.HISTORY}{n + 2:06d}", event(n + 2, other, champ))  # died before the alias
        e = tracking.set_alias(cfg, "champion", champ, "after the crash", kind="promote")
        hist = tracking.alias_history(cfg)
        assert [(x["seq"], x["from"], x["to"]) for x in hist[-2:]] == [(n + 1, champ, other), (n + 2, other, champ)] and e["seq"] == n + 2
        assert not any(x.get("pending") for x in hist) and hist[-1]["why"] == "after the crash"
        assert int(c.get_model_version_by_alias(name, "champion").version) == champ
    finally:
        for k in env: os.environ.pop(k, None)


def test_the_model_lock_waits_for_its_holder_and_a_holder_that_cannot_renew_moves_nothing(team_stack):
    """The lock that serializes promotions on a server (a bakery on the model's tags): a second process waits while the
    holder renews it; a holder that stops renewing (a paused process, a server too slow to take its beats) refuses to move
    anything once half its lease has passed without a renewal, before anyone could take the lock; after the lease another
    takes it over, and the old holder knows it lost it. A released lock leaves no tag behind."""
    from mlnb import tracking
    from mlnb.errors import TrackingError
    name, lease = unique("team-lock"), 6.0
    client(team_stack.mlflow_uri).create_registered_model(name)
    reg = tracking._RestRegistry(team_stack.mlflow_uri)
    a = tracking._ServerLock(reg, name, lease=lease).acquire(10)
    a.check()
    with pytest.raises(TrackingError, match="is being changed by"):
        tracking._ServerLock(reg, name, lease=lease).acquire(lease + 2)  # a renews every lease/6: never stale, the other gives up
    a._stop.set()  # a stops renewing, as a paused process does
    time.sleep(lease / 2 + 0.5)
    with pytest.raises(TrackingError, match="last renewed"):
        a.check()  # nobody has taken it yet (its tag is there), but a cannot know it still holds it
    assert a.key in reg.model(name)["tags"]
    t0 = time.monotonic()
    b = tracking._ServerLock(reg, name, lease=lease).acquire(60)
    assert time.monotonic() - t0 >= lease, "taken over only once the holder's tag had stood unchanged for the lease"
    assert a.key not in reg.model(name)["tags"]
    with pytest.raises(TrackingError):
        a.check()
    b.check()
    b.release()
    time.sleep(lease / 3)  # two beat intervals: nothing writes the released tag back
    assert not [k for k in reg.model(name)["tags"] if k.startswith(tracking.LOCK)], "no lock tag left behind"
