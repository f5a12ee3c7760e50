"What a pipeline run leaves in MLflow (a real SQLite store in the test's folder)."
import json, subprocess
from pathlib import Path
from conftest import add_stage, run_json, run_mlnb


def client(project):
    from mlflow import MlflowClient
    uri = f"sqlite:///{project}/.mlnb/mlflow.db"
    return MlflowClient(uri, uri)


def runs_of(c, pipeline_run_id):
    exp = c.get_experiment_by_name("test")
    return c.search_runs([exp.experiment_id], f"tags.`mlnb.run_id` = '{pipeline_run_id}'")


def test_parent_and_nested_runs(chain):
    subprocess.run(["git", "init", "-q"], cwd=chain, check=True)
    subprocess.run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-q", "--allow-empty", "-m", "x"], cwd=chain, check=True)
    rec = run_json(chain, "run", "-p", "factor=3")
    c = client(chain)
    runs = runs_of(c, rec["run_id"])
    parent = [r for r in runs if r.data.tags.get("mlnb.kind") == "pipeline"]
    assert len(parent) == 1 and len(runs) == 4
    parent = parent[0]
    assert parent.info.status == "FINISHED"
    assert parent.data.params["b.factor"] == "3"
    assert parent.data.tags["mlnb.git.commit"] == rec["git"]["commit"] and len(rec["git"]["commit"]) == 40
    assert parent.data.tags["mlnb.git.dirty"] == "false"
    assert parent.data.tags["mlnb.data_digest"] == rec["data_digest"]
    assert parent.data.tags["mlnb.version"]
    nested = {r.data.tags["mlnb.stage"]: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert set(nested) == {"a", "b", "c"}
    a = nested["a"]
    assert a.data.metrics["n"] == 3.0 and a.data.metrics["duration_s"] > 0
    assert a.data.params["n"] == "3" and a.data.tags["mlnb.cache"] == "miss"
    assert a.data.tags["mlnb.product.nums.sha256"] == rec["stages"]["a"]["products"]["nums"]["sha256"]
    assert sorted(f.path for f in c.list_artifacts(a.info.run_id, "notebooks")) == ["notebooks/a.html", "notebooks/a.ipynb"]
    local = c.download_artifacts(a.info.run_id, "notebooks/a.ipynb", str(chain / "dl"))
    assert json.loads(Path(local).read_text())["cells"], "the executed notebook is in MLflow"
    page = Path(c.download_artifacts(a.info.run_id, "notebooks/a.html", str(chain / "dl"))).read_text()
    assert page.startswith("<!DOCTYPE html>") and "jp-Notebook" in page and page.count("jp-CodeCell") >= 2, "and rendered, as the UI shows it"
    # the model-training view of the UI, runs attributed to who ran them, the run's metrics on its parent to compare runs by
    assert c.get_experiment_by_name("test").tags["mlflow.experimentKind"] == "custom_model_development"
    assert parent.data.tags["mlflow.user"] == rec["user"] == a.data.tags["mlflow.user"] and rec["user"] != "unknown"
    assert parent.data.metrics["n"] == 3.0

    # a fully reused run is recorded too (by the background follower); `mlnb sync` waits for nothing and logs nothing twice
    again = run_json(chain, "run", "-p", "factor=3")
    run_mlnb(chain, "sync", again["run_id"], check=0)
    run_mlnb(chain, "sync", check=0)
    runs2 = runs_of(c, again["run_id"])
    assert len(runs2) == 4
    assert {r.data.tags["mlnb.cache"] for r in runs2 if "mlnb.stage" in r.data.tags} == {"hit"}
    assert len(runs_of(c, rec["run_id"])) == 4


def test_failed_run_is_recorded_failed(chain):
    add_stage(chain, "b", "upstream = ['a']", "raise RuntimeError('boom')")
    run_mlnb(chain, "run", check=1)
    c = client(chain)
    exp = c.get_experiment_by_name("test")
    runs = c.search_runs([exp.experiment_id])
    parent = [r for r in runs if r.data.tags.get("mlnb.kind") == "pipeline"][0]
    assert parent.info.status == "FAILED"
    b = [r for r in runs if r.data.tags.get("mlnb.stage") == "b"][0]
    assert b.info.status == "FAILED" and "RuntimeError: boom" in b.data.tags["mlnb.error"]
    assert sorted(f.path for f in c.list_artifacts(b.info.run_id, "notebooks")) == ["notebooks/b.html", "notebooks/b.ipynb"]
