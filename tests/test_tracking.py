"What a pipeline run leaves in MLflow (a real SQLite store in the test's folder)."
import json, subprocess
import pytest
from pathlib import Path
from conftest import add_stage, run_json, run_mlnb


def client(project):
    from mlflow import MlflowClient
    uri = f"sqlite:///{project}/.mlnb/mlflow.db"
    return MlflowClient(uri, uri)


def runs_of(c, pipeline_run_id):
    exp = c.get_experiment_by_name("test")
    return c.search_runs([exp.experiment_id], f"tags.`mlnb.run_id` = '{pipeline_run_id}'")


@pytest.fixture
def project(project):
    "This module checks the stages' HTML pages: they are on, as by default (conftest's small projects turn them off)."
    ini = project / "settings.ini"
    ini.write_text(ini.read_text().replace("notebook_pages = false\n", ""))
    return project


def test_notebook_pages_off_logs_each_notebook_without_its_page(chain):
    ini = chain / "settings.ini"
    ini.write_text(ini.read_text() + "notebook_pages = false\n")
    rec = run_json(chain, "run")
    assert rec["tracking"] == "synced", rec["tracking"]  # no process follows to render pages
    c = client(chain)
    logged = sorted(f.path for r in runs_of(c, rec["run_id"]) for f in c.list_artifacts(r.info.run_id, "notebooks"))
    assert logged == ["notebooks/a.ipynb", "notebooks/b.ipynb", "notebooks/c.ipynb"]
    assert not (chain / ".mlnb" / "pages").exists()
    run_mlnb(chain, "sync", rec["run_id"], check=0)
    assert sorted(f.path for r in runs_of(c, rec["run_id"]) for f in c.list_artifacts(r.info.run_id, "notebooks")) == logged
    ini.write_text(ini.read_text().replace("notebook_pages = false", "notebook_pages = sometimes"))
    err = run_mlnb(chain, "run", check=1).stderr
    assert "notebook_pages" in err and "accepted: true, false" in err, err


def test_parent_and_nested_runs(chain):
    subprocess.run(["git", "init", "-q"], cwd=chain, check=True)
    subprocess.run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-q", "--allow-empty", "-m", "x"], cwd=chain, check=True)
    rec = run_json(chain, "run", "-p", "factor=3", "--wait-tracking")  # the notebooks' HTML pages too, not a second later
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
    run_mlnb(chain, "run", "--wait-tracking", check=1)
    c = client(chain)
    exp = c.get_experiment_by_name("test")
    runs = c.search_runs([exp.experiment_id])
    parent = [r for r in runs if r.data.tags.get("mlnb.kind") == "pipeline"][0]
    assert parent.info.status == "FAILED"
    b = [r for r in runs if r.data.tags.get("mlnb.stage") == "b"][0]
    assert b.info.status == "FAILED" and "RuntimeError: boom" in b.data.tags["mlnb.error"]
    assert sorted(f.path for f in c.list_artifacts(b.info.run_id, "notebooks")) == ["notebooks/b.html", "notebooks/b.ipynb"]


# --- the direct path: mlnb writes MLflow's SQLite store itself -------------------------------------------------------

def _store(d, name="test"):
    "A fresh MLflow SQLite store in `d` with the project's experiment, made by MLflow itself."
    from mlflow import MlflowClient
    d.mkdir(parents=True)
    uri = f"sqlite:///{d}/mlflow.db"
    MlflowClient(uri, uri).create_experiment(name, artifact_location=(d / "artifacts").as_uri(), tags={"mlflow.experimentKind": "custom_model_development"})
    return uri


def _read_back(uri):
    "Everything MLflow's client and `mlflow.search_runs` return about the experiment's runs, without ids that differ per store."
    import mlflow
    from mlflow import MlflowClient
    c = MlflowClient(uri, uri)
    exp = c.get_experiment_by_name("test")
    runs = c.search_runs([exp.experiment_id])
    key = {r.info.run_id: r.data.tags.get("mlnb.stage", "pipeline") for r in runs}
    def files(run_id, path=None):
        out = []
        for f in c.list_artifacts(run_id, path):
            out += files(run_id, f.path) if f.is_dir else [(f.path, f.file_size)]
        return out
    out = {}
    for r in runs:
        tags = dict(r.data.tags)
        if "mlflow.parentRunId" in tags: tags["mlflow.parentRunId"] = key[tags["mlflow.parentRunId"]]
        assert r.info.artifact_uri == f"{exp.artifact_location}/{r.info.run_id}/artifacts"
        out[key[r.info.run_id]] = {
            "info": (r.info.run_name, r.info.status, r.info.start_time, r.info.end_time, r.info.lifecycle_stage, r.info.user_id),
            "params": r.data.params, "metrics": r.data.metrics, "tags": tags, "files": sorted(files(r.info.run_id)),
            "history": {k: [(m.value, m.step) for m in c.get_metric_history(r.info.run_id, k)] for k in r.data.metrics}}
    mlflow.set_tracking_uri(uri)
    df = mlflow.search_runs(experiment_names=["test"]).drop(columns=["run_id", "experiment_id", "artifact_uri", "tags.mlflow.parentRunId"])
    return out, df.sort_values("tags.mlflow.runName").reset_index(drop=True)


@pytest.mark.slow
def test_a_run_written_directly_reads_back_as_mlflow_writes_it(chain, tmp_path):
    import dataclasses, sys
    from mlnb import tracking
    from mlnb.config import load_config
    run_json(chain, "run")  # a new store (made by MLflow, or a copy of the empty store MLflow made once: the next test)
    rec = run_json(chain, "run", "--force", "-p", "factor=5")  # the store is known now: written from the run's own process
    assert rec["tracking"].startswith("synced; the notebooks' HTML pages follow in the background"), rec["tracking"]
    c = client(chain)
    runs = runs_of(c, rec["run_id"])
    assert len(runs) == 4 and {r.info.status for r in runs} == {"FINISHED"}, "the run is in MLflow when `mlnb run` returns"
    a = [r for r in runs if r.data.tags.get("mlnb.stage") == "a"][0]
    assert [f.path for f in c.list_artifacts(a.info.run_id, "notebooks")] in (["notebooks/a.ipynb"], ["notebooks/a.html", "notebooks/a.ipynb"])
    run_mlnb(chain, "sync", rec["run_id"], check=0)  # waits for the pages
    assert sorted(f.path for f in c.list_artifacts(a.info.run_id, "notebooks")) == ["notebooks/a.html", "notebooks/a.ipynb"]
    assert len(runs_of(c, rec["run_id"])) == 4

    # the same run folder logged into two new stores: by mlnb's own writes (in a process that must not import mlflow) and by MlflowClient
    cfg, run_dir = load_config(chain), chain / ".mlnb" / "runs" / rec["run_id"]
    direct, slow = _store(tmp_path / "direct"), _store(tmp_path / "client")
    (run_dir / "tracking.json").unlink()
    code = ("import sys; from mlnb import tracking; from mlnb.config import load_config; cfg = load_config(sys.argv[1]); "
            "assert tracking._direct_runs(cfg); tracking.sync_run(cfg, sys.argv[2]); tracking.sync_run(cfg, sys.argv[2]); "
            "assert 'mlflow' not in sys.modules and 'sqlalchemy' not in sys.modules, 'the direct path imported mlflow'")
    p = subprocess.run([sys.executable, "-c", code, str(chain), str(run_dir)], capture_output=True, text=True, env={**__import__("os").environ, "MLNB_TRACKING_URI": direct})
    assert p.returncode == 0, p.stderr
    (run_dir / "tracking.json").unlink()
    tracking.sync_run(dataclasses.replace(cfg, tracking_uri=slow), run_dir, client=True)
    fast, fast_df = _read_back(direct)
    ref, ref_df = _read_back(slow)
    assert set(ref) == {"pipeline", "a", "b", "c"} and ref["a"]["params"] == {"n": "3"} and ref["b"]["params"] == {"factor": "5"}
    for k in ref: assert fast[k] == ref[k], k
    import pandas as pd
    pd.testing.assert_frame_equal(fast_df, ref_df)


@pytest.mark.slow
def test_a_new_projects_store_is_a_copy_of_the_empty_store_mlflow_made(tmp_path):
    """The first new project's store is made by MLflow (its schema migrations take seconds), which is kept once per MLflow
    version in the user's cache; the next new project's store is a copy of it, which MLflow reads as its own, and its first
    run is written from the run's own process. A kept copy that holds anything but what MLflow makes is not used."""
    import sqlite3
    from mlflow import MlflowClient
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache")}
    def new(name):
        d = tmp_path / name; (d / "pipeline").mkdir(parents=True)
        (d / "settings.ini").write_text("[mlnb]\npipeline = pipeline\nexperiment = exp\njobs = 1\n")
        add_stage(d, "a", "upstream = []\nn = 3", "from mlnb import stage\nstage.save('nums', {'n': n})\nstage.log_metric('n', n)")
        return d
    first = run_json(new("first"), "run", env=env)
    assert first["tracking"] == "synced"  # through MlflowClient, in the follower process
    kept = list((tmp_path / "cache" / "mlnb").glob("mlflow-*-new-store.db"))
    assert len(kept) == 1
    rec = run_json(new("second"), "run", env=env)
    assert rec["tracking"].startswith("synced; the notebooks' HTML pages follow"), rec["tracking"]  # the run's own process wrote it
    def schema(d):  # each table's and index's definition as a set of lines: MLflow's migrations order a table's constraints differently each time
        rows = sqlite3.connect(d / ".mlnb" / "mlflow.db").execute("SELECT type, name, sql FROM sqlite_master").fetchall()
        return sorted((t, n, sorted(line.strip().rstrip(",").strip() for line in (sql or "").splitlines())) for t, n, sql in rows)
    assert schema(tmp_path / "second") == schema(tmp_path / "first")
    uri = f"sqlite:///{tmp_path / 'second' / '.mlnb' / 'mlflow.db'}"
    c = MlflowClient(uri, uri)
    exps = {e.name: e for e in c.search_experiments()}
    assert set(exps) == {"Default", "exp"} and exps["exp"].artifact_location == (tmp_path / "second" / ".mlnb" / "artifacts").resolve().as_uri()
    assert exps["exp"].tags["mlflow.experimentKind"] == "custom_model_development"
    runs = c.search_runs([exps["exp"].experiment_id], f"tags.`mlnb.run_id` = '{rec['run_id']}'")
    assert len(runs) == 2 and {r.info.status for r in runs} == {"FINISHED"}
    # a kept copy with a row MLflow does not make is not copied: MLflow makes the store
    with sqlite3.connect(kept[0]) as db:
        db.execute("INSERT INTO experiments (name, artifact_location, lifecycle_stage, workspace) VALUES ('planted', '/x', 'active', 'default')")
    third = run_json(new("third"), "run", env=env)
    assert third["tracking"] == "synced"
    assert kept[0].exists() and "planted" not in kept[0].read_bytes().decode("latin-1")  # set aside, and a clean one kept again
    uri = f"sqlite:///{tmp_path / 'third' / '.mlnb' / 'mlflow.db'}"
    assert {e.name for e in MlflowClient(uri, uri).search_experiments()} == {"Default", "exp"}


def test_a_runs_sync_renders_its_pages_without_building_jsonschemas_uri_grammar(chain):
    """Every run's follower (`mlnb sync --follow`, a process of its own) imports nbformat and nbconvert, and so jsonschema,
    which builds an RFC 3987 grammar at import (about 1 s of CPU) for a URI format no notebook's schema uses: mlnb's
    processes skip it. The sync still renders and logs every page."""
    import sys
    rec = run_json(chain, "run", "--wait-tracking")
    probe = ("import atexit, json, sys\n"
             "atexit.register(lambda: print(json.dumps({'jsonschema': 'jsonschema' in sys.modules, 'nbconvert': 'nbconvert' in sys.modules,"
             " 'grammar': sys.modules.get('rfc3987_syntax') is not None})))\n"
             "from mlnb.cli import main; main()")
    p = subprocess.run([sys.executable, "-c", probe, "--project", str(chain), "sync", rec["run_id"], "--follow"],
                       capture_output=True, text=True, timeout=120, cwd=chain)
    assert p.returncode == 0, p.stderr
    seen = json.loads(p.stdout.splitlines()[-1])
    assert seen == {"jsonschema": True, "nbconvert": True, "grammar": False}, seen
    c = client(chain)
    pages = [f.path for r in runs_of(c, rec["run_id"]) for f in c.list_artifacts(r.info.run_id, "notebooks")]
    assert sorted(p for p in pages if p.endswith(".html")) == ["notebooks/a.html", "notebooks/b.html", "notebooks/c.html"]


def test_a_reused_stages_page_is_the_one_rendered_when_it_ran(chain):
    """The HTML page of a stage reused from the cache is its notebook's page as rendered when the stage ran (kept by the
    notebook's content digest): a fully reused run's pages reach MLflow without nbconvert even being imported."""
    import sys
    first = run_json(chain, "run", "--wait-tracking")
    probe = ("import atexit, json, sys\n"
             "atexit.register(lambda: print(json.dumps({'nbconvert': 'nbconvert' in sys.modules})))\n"
             "from mlnb.cli import main; main()")
    p = subprocess.run([sys.executable, "-c", probe, "--project", str(chain), "run", "--wait-tracking", "--json"],
                       capture_output=True, text=True, timeout=300, cwd=chain)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.strip().splitlines()
    again = json.loads("\n".join(lines[:-1]))
    assert set(again["stages"]) == {"a", "b", "c"} and {s["status"] for s in again["stages"].values()} == {"cached"}
    assert json.loads(lines[-1]) == {"nbconvert": False}, "the pages of a fully reused run are the ones kept, not rendered again"
    c = client(chain)
    def pages(run_id):
        out = {}
        for r in runs_of(c, run_id):
            if "mlnb.stage" in r.data.tags:
                out[r.data.tags["mlnb.stage"]] = Path(c.download_artifacts(r.info.run_id, f"notebooks/{r.data.tags['mlnb.stage']}.html", str(chain / "dl" / r.info.run_id))).read_text()
        return out
    before, after = pages(first["run_id"]), pages(again["run_id"])
    assert set(after) == {"a", "b", "c"} and after == before and all(p.startswith("<!DOCTYPE html>") for p in after.values())
