"The reference pipeline of this repository, end to end, in a copy of the project (real kernels, real MLflow store)."
import json, shutil
from pathlib import Path
import pytest
from conftest import ROOT, run_json, run_mlnb, statuses

STAGES = {"ingest", "validate", "features", "train", "evaluate", "gate", "register"}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    d = tmp_path_factory.mktemp("reference")
    shutil.copy(ROOT / "settings.ini", d / "settings.ini")
    shutil.copytree(ROOT / "nbs/pipeline", d / "nbs/pipeline")
    first = run_json(d, "run", "--jobs", "2", timeout=600)
    return d, first


def test_runs_end_to_end_and_registers_a_model(reference):
    d, rec = reference
    assert set(rec["stages"]) == STAGES and set(statuses(rec).values()) == {"done"}
    assert list(rec["stages"])[:4] == ["ingest", "validate", "features", "train"] and list(rec["stages"])[-1] == "register"
    metrics = json.loads((Path(rec["stages"]["evaluate"]["entry"]) / "metrics.json").read_text())
    assert metrics["roc_auc"] > 0.8 and 0 < metrics["pr_auc"] < 1 and 0 < metrics["f1"] < 1
    mv = json.loads((Path(rec["stages"]["register"]["entry"]) / "model_version.json").read_text())
    assert mv["name"] == "fraud-detector" and mv["version"] == 1

    import mlflow
    from mlflow import MlflowClient
    uri = f"sqlite:///{d}/.mlnb/mlflow.db"
    c = MlflowClient(uri, uri)
    version = c.get_model_version("fraud-detector", "1")
    assert version.tags["mlnb.run_id"] == rec["run_id"]
    assert version.tags["mlnb.data_digest"] == rec["data_digest"]
    parent = c.get_run(version.tags["mlnb.parent_run_id"])
    assert parent.data.tags["mlnb.run_id"] == rec["run_id"] and parent.data.tags["mlnb.kind"] == "pipeline"
    assert c.get_run(version.run_id).data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert float(version.tags["holdout.roc_auc"]) == pytest.approx(metrics["roc_auc"], abs=1e-6)

    # the registered model is the whole sklearn Pipeline: raw transactions in, fraud scores out
    mlflow.set_tracking_uri(uri); mlflow.set_registry_uri(uri)
    model = mlflow.pyfunc.load_model("models:/fraud-detector/1")
    assert model.metadata.signature is not None
    from mlnb.data import generate_transactions, FEATURES
    batch = generate_transactions(50, seed=123)[FEATURES]
    preds = model.predict(batch)
    assert len(preds) == 50 and set(map(int, preds)) <= {0, 1}
    sk = mlflow.sklearn.load_model("models:/fraud-detector/1")
    assert sk.predict_proba(batch).shape == (50, 2)


def test_rerun_reuses_everything_and_registers_nothing_new(reference):
    d, first = reference
    again = run_json(d, "run", "--wait-tracking")
    assert set(statuses(again).values()) == {"cached"}
    from mlflow import MlflowClient
    uri = f"sqlite:///{d}/.mlnb/mlflow.db"
    assert len(MlflowClient(uri, uri).search_model_versions("name='fraud-detector'")) == 1


def test_param_change_retrains_from_the_stage_it_reaches(reference):
    d, first = reference
    rec = run_json(d, "run", "-p", "learning_rate=0.1", timeout=600)
    assert statuses(rec) == {"ingest": "cached", "validate": "cached", "features": "cached",
                             "train": "done", "evaluate": "done", "gate": "done", "register": "done"}
    mv = json.loads((Path(rec["stages"]["register"]["entry"]) / "model_version.json").read_text())
    assert mv["version"] == 2


def test_validate_stage_names_each_broken_check(reference):
    d, _ = reference
    p = run_mlnb(d, "run", "-p", "n_rows=500", check=1)
    assert "stage 'validate' failed" in p.stderr and "ValidationError" in p.stderr and "500 rows, need at least 1000" in p.stderr
