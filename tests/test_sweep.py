"""Sweeps (`mlnb run --sweep`): one trial per combination, the stages before the sweep once, each trial a pipeline run of
its own nested under the sweep's MLflow run, only the best trial registered; reruns reuse finished trials, `--resume`
continues a broken sweep."""
import json, time
from pathlib import Path
import pytest

from conftest import add_stage, run_json, run_mlnb, statuses

pytestmark = pytest.mark.slow


@pytest.fixture
def sweepable(project):
    "data -> train (p, q) -> evaluate (logs score, best at p=2, q=b) -> register (keeps what it is given)."
    flag = project / "break-p3"
    add_stage(project, "data", "upstream = []", "from mlnb import stage\nstage.save('base', {'b': 1})")
    add_stage(project, "train", "upstream = ['data']\np = 1\nq = 'a'",
              "import time\nfrom pathlib import Path\nfrom mlnb import stage\nt0 = time.time()\n"
              f"if p == 3 and Path({str(flag)!r}).exists(): raise ValueError('p=3 is broken')\n"
              "time.sleep(1.5)\nstage.save('m', {'p': p, 'q': q, 't0': t0, 't1': time.time()})")
    add_stage(project, "evaluate", "upstream = ['train']",
              "from mlnb import stage\nm = stage.load('m')\nstage.log_metrics({'score': -(m['p'] - 2) ** 2 + (m['q'] == 'b')})\nstage.save('e', {'ok': 1})")
    add_stage(project, "register", "upstream = ['train', 'evaluate']",
              "from mlnb import stage\ndef register(m): return {'p': m['p'], 'q': m['q']}\nstage.save('chosen', register(stage.load('m')))")
    return project


def product(rec, stage, name):
    return json.loads((Path(rec["stages"][stage]["entry"]) / f"{name}.json").read_text())


def test_a_sweep_runs_each_trial_and_registers_only_the_best(sweepable):
    rec = run_json(sweepable, "run", "--sweep", "train.p=1:3", "--sweep", "q=a,b", "--select", "max:score", "--jobs", "2")
    assert [t["params"] for t in rec["trials"]] == [{"train.p": str(p), "q": q} for p in (1, 2, 3) for q in "ab"]
    assert all(t["status"] == "done" for t in rec["trials"]) and rec["status"] == "done"
    assert rec["plan"] == {"before": ["data"], "per_trial": ["train", "evaluate"], "final": ["register"]}
    best = next(t for t in rec["trials"] if t["trial"] == rec["best"])
    assert best["params"] == {"train.p": "2", "q": "b"} and best["value"] == 1.0
    assert product(rec["final"], "register", "chosen") == {"p": 2, "q": "b"}, "the best trial's model is the one registered"
    runs = {r["run_id"]: r for r in (json.loads(p.read_text()) for p in (sweepable / ".mlnb/runs").glob("*/run.json"))}
    trial_runs = [runs[t["run_id"]] for t in rec["trials"]]
    for r in trial_runs:  # each trial ran its own train and evaluate, read data's products, and registered nothing
        assert statuses(r) == {"data": "cached", "train": "done", "evaluate": "done", "register": "not run"}, statuses(r)
    assert sum(s["stages"]["data"]["status"] == "done" for s in runs.values()) == 1, "the stages before the sweep ran once"
    assert statuses(rec["final"]) == {"data": "cached", "train": "cached", "evaluate": "cached", "register": "done"}
    t1 = rec["trials"][0]  # `mlnb status` and `mlnb show` say which part of which sweep a run was
    status = run_mlnb(sweepable, "status", check=0).stdout
    assert f"{t1['run_id']}" in status and f"(trial 1 (train.p=1, q=a) of sweep {rec['id']})" in status, status
    assert f"(the final stages, for the best trial (train.p=2, q=b) of sweep {rec['id']})" in status, status
    assert f"  sweep    trial 1 (train.p=1, q=a) of sweep {rec['id']}" in run_mlnb(sweepable, "show", t1["run_id"], check=0).stdout
    spans = sorted((product(r, "train", "m")["t0"], product(r, "train", "m")["t1"]) for r in trial_runs)
    assert any(b[0] < a[1] for a, b in zip(spans, spans[1:])), f"with --jobs 2 some trials overlap: {spans}"
    # MLflow: the trials' pipeline runs are nested under the sweep's run, with their parameters and metrics
    import mlflow
    c = mlflow.MlflowClient(f"sqlite:///{sweepable / '.mlnb/mlflow.db'}")
    from mlnb.tracking import sync_run
    from mlnb.config import load_config
    for r in runs.values(): sync_run(load_config(sweepable), sweepable / ".mlnb/runs" / r["run_id"])
    exp = c.get_experiment_by_name("test").experiment_id
    sweep = c.get_run(rec["parent_run_id"])
    assert sweep.data.tags["mlnb.kind"] == "sweep" and sweep.data.metrics["best_score"] == 1.0 and sweep.info.status == "FINISHED"
    assert sweep.data.params["sweep.train.p"] == "1, 2, 3" and sweep.data.tags["mlnb.best_trial"] == str(rec["best"])
    kids = c.search_runs([exp], f"tags.mlflow.parentRunId = '{rec['parent_run_id']}'", max_results=100)
    trials = {k.data.tags["mlnb.trial"]: k for k in kids}
    assert set(trials) == {*(str(t["trial"]) for t in rec["trials"]), "before", "final"}
    for t in rec["trials"]:
        k = trials[str(t["trial"])]
        assert k.data.params["train.p"] == t["params"]["train.p"] and k.data.params["train.q"] == t["params"]["q"]
        assert k.data.metrics["score"] == t["value"]
    # a rerun of the same sweep reuses every finished trial: nothing runs again
    again = run_json(sweepable, "run", "--sweep", "train.p=1:3", "--sweep", "q=a,b", "--select", "max:score", "--jobs", "2")
    assert again["id"] != rec["id"] and again["best"] == rec["best"]
    for t in again["trials"]:
        r = json.loads((sweepable / ".mlnb/runs" / t["run_id"] / "run.json").read_text())
        assert (r["stages"]["train"]["status"], r["stages"]["evaluate"]["status"]) == ("cached", "cached")
    assert statuses(again["final"])["register"] == "cached"


def test_a_broken_sweep_resumes(sweepable):
    (sweepable / "break-p3").touch()
    p = run_mlnb(sweepable, "run", "--sweep", "p=1,2,3", "--select", "max:score", check=1)
    assert "trial(s) 3 failed" in p.stderr and "ValueError: p=3 is broken" in p.stderr, p.stderr
    sweep = json.loads(next((sweepable / ".mlnb/sweeps").glob("*.json")).read_text())
    assert [t["status"] for t in sweep["trials"]] == ["done", "done", "failed"] and sweep["status"] == "failed"
    assert sweep["best"] == 2 and json.loads(json.dumps(sweep["final"]))["stages"]["register"]["status"] == "done"
    (sweepable / "break-p3").unlink()
    resumed = run_json(sweepable, "run", "--sweep", "p=1,2,3", "--select", "max:score", "--resume")
    assert resumed["id"] == sweep["id"] and resumed["status"] == "done"
    assert [t["run_id"] for t in resumed["trials"]] == [t["run_id"] for t in sweep["trials"]], "the failed trial's own run was resumed"
    assert json.loads((sweepable / ".mlnb/runs" / resumed["trials"][2]["run_id"] / "run.json").read_text())["attempt"] == 2
    p = run_mlnb(sweepable, "run", "--sweep", "p=1,2,3", "--select", "max:score", "--resume", check=1)
    assert "no unfinished sweep of these values to resume" in p.stderr


def test_sweep_input_errors_name_what_is_accepted(sweepable):
    for args, said in [(["--sweep", "depth=1,2"], "no stage has a parameter 'depth'"),
                       (["--sweep", "p=1,x"], "expected int"),
                       (["--sweep", "p=0.1:0.5"], "a range of decimals needs a step"),
                       (["--sweep", "p=1,2", "-p", "p=3"], "p is both swept (--sweep) and set (-p)"),
                       (["--sweep", "p=1,2", "--select", "score"], "settings.ini [mlnb] has no target"),
                       (["--sweep", "p=1,2", "--select", "best:score"], "accepted is METRIC, max:METRIC or min:METRIC"),
                       (["--sweep", "p=1,2", "--select", "max:nothing"], "no stage of the trial logged nothing"),
                       (["--select", "max:score"], "--select picks a sweep's best trial")]:
        p = run_mlnb(sweepable, "run", *args)
        assert p.returncode in (1, 2) and said in p.stderr and "Traceback" not in p.stderr, (args, p.stderr)


def test_ctrl_c_interrupts_the_trials_and_the_sweep_resumes(project):
    import signal, subprocess
    from conftest import MLNB
    hold, started = project / "hold", project / "started"
    hold.touch(); started.mkdir()
    add_stage(project, "train", "upstream = []\np = 1",
              f"import time\nfrom pathlib import Path\nfrom mlnb import stage\nPath({str(started)!r}, str(p)).touch()\n"
              f"while Path({str(hold)!r}).exists(): time.sleep(0.2)\nstage.log_metric('score', p)\nstage.save('m', {{'p': p}})")
    add_stage(project, "register", "upstream = ['train']", "from mlnb import stage\ndef register(m): return m\nstage.save('c', register(stage.load('m')))")
    proc = subprocess.Popen([*MLNB, "--project", str(project), "run", "--sweep", "p=1,2,3", "--select", "max:score", "--jobs", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while len(list(started.iterdir())) < 2 and time.time() < deadline: time.sleep(0.2)
    proc.send_signal(signal.SIGINT)  # the sweep's process only: it interrupts its trials itself
    out, err = proc.communicate(timeout=90)
    assert proc.returncode == 130 and "sweep interrupted; continue it with the same command and --resume" in err, err
    sweep = json.loads(next((project / ".mlnb/sweeps").glob("*.json")).read_text())
    assert sweep["status"] == "interrupted" and [t["status"] for t in sweep["trials"]] == ["interrupted", "interrupted", "pending"]
    for t in sweep["trials"][:2]:
        assert json.loads((project / ".mlnb/runs" / t["run_id"] / "run.json").read_text())["status"] == "interrupted"
    hold.unlink()
    resumed = run_json(project, "run", "--sweep", "p=1,2,3", "--select", "max:score", "--resume")
    assert resumed["id"] == sweep["id"] and resumed["status"] == "done" and resumed["best"] == 3
    assert [t["run_id"] for t in resumed["trials"][:2]] == [t["run_id"] for t in sweep["trials"][:2]], "the interrupted runs resumed"
