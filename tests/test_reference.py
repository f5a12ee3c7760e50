"The reference pipeline of this repository, end to end, in a copy of the project (real kernels, real MLflow store)."
import json, shutil
from pathlib import Path
import pytest
from conftest import ROOT, run_json, run_mlnb, statuses

pytestmark = pytest.mark.slow  # one project built up test after test: a registered model, a bento, a served service

STAGES = {"ingest", "examples", "validate", "features", "train", "evaluate", "gate", "register"}


@pytest.fixture(scope="module")
def reference(reference_run):
    "The session's one run of the reference pipeline (conftest.reference_run): every stage executed, in its own project."
    d, first, _ = reference_run
    return d, first


def test_runs_end_to_end_and_registers_a_model(reference):
    d, rec = reference
    assert set(rec["stages"]) == STAGES and set(statuses(rec).values()) == {"done"}
    assert list(rec["stages"])[:5] == ["ingest", "examples", "validate", "features", "train"] and list(rec["stages"])[-1] == "register"
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


def test_examples_have_the_account_features_of_their_time(reference):
    "Feast's point-in-time join of 20,000 transactions gives each the features its label was drawn from (the newest snapshot at or before it)."
    import pandas as pd
    from mlnb.data import ACCOUNT_FEATURES, generate_transactions
    d, rec = reference
    examples = pd.read_parquet(Path(rec["stages"]["examples"]["entry"]) / "examples.parquet")
    truth = generate_transactions(20000, seed=42)  # ingest's defaults
    assert len(examples) == 20000 and not examples[ACCOUNT_FEATURES].isna().any().any()
    pd.testing.assert_frame_equal(examples[["tx_id", *ACCOUNT_FEATURES]], truth[["tx_id", *ACCOUNT_FEATURES]])
    # the model's features are the same columns as the contract's; the account key and the event time are not among them
    assert (d / ".mlnb/data/account_snapshots.parquet").is_file()
    assert run_json(d, "features", "get", "account_id=7")["n_tx_24h"] >= 0  # register loaded the online store


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
    assert statuses(rec) == {"ingest": "cached", "examples": "cached", "validate": "cached", "features": "cached",
                             "train": "done", "evaluate": "done", "gate": "done", "register": "done"}
    mv = json.loads((Path(rec["stages"]["register"]["entry"]) / "model_version.json").read_text())
    assert mv["version"] == 2


def test_validate_stage_names_each_broken_check(reference):
    d, _ = reference
    p = run_mlnb(d, "run", "-p", "n_rows=500", check=1)
    assert "stage 'validate' failed" in p.stderr and "ValidationError" in p.stderr and "500 rows, need at least 1000" in p.stderr


def test_model_card_for_the_version(reference):
    d, rec = reference
    card = run_mlnb(d, "card", "1", check=0).stdout
    assert card.startswith("# Card-fraud detector") and "## Intended use" in card and "## Version 1" in card
    assert rec["run_id"] in card and rec["git"]["commit"] in card
    for section in ("## Training data", "## Metrics (holdout)", "## Gates", "## Fairness by `age_band`", "## How it was made", "## Limitations the numbers show"):
        assert section in card, section
    assert sum(line.startswith(("| 18-25", "| 26-40", "| 41-60", "| 60+")) for line in card.splitlines()) == 4
    html = run_mlnb(d, "card", "1", "--html", check=0).stdout
    assert html.startswith("<!doctype html>") and "<td>min_roc_auc</td>" in html
    p = run_mlnb(d, "card", "7", check=1)
    assert "model 'fraud-detector' has no version '7'" in p.stderr


def test_every_stage_result_is_audited(reference):
    d, rec = reference
    evs = run_json(d, "audit", "--ref", f"run={rec['run_id']}")
    kinds = [e["kind"] for e in evs]
    assert kinds[0] == "run.started" and kinds[-1] == "run.finished" and kinds.count("stage.finished") == 8
    assert {e["refs"]["stage"]: e["data"]["status"] for e in evs if e["kind"] == "stage.finished"} == {s: "done" for s in STAGES}
    assert "model.registered" in kinds and "gate.decision" in kinds
    promoted = run_json(d, "audit", "--kind", "model.promoted", "--ref", "version=1")
    assert len(promoted) == 1 and promoted[0]["refs"]["alias"] == "champion" and promoted[0]["data"]["why"].startswith("all 6 gates passed")
    decision = next(e for e in evs if e["kind"] == "gate.decision")
    assert decision["data"]["passed"] and decision["data"]["action"] == "promoted" and "fairness_equalized_odds" in decision["data"]["gates"]


def test_a_changed_feature_definition_reruns_the_stages_that_read_the_store(reference):
    "examples (it calls training_frame) and register (it declares the definitions); the same examples: the rest is reused."
    d, _ = reference
    nb = d / "nbs/pipeline/_features.ipynb"
    before = nb.read_text()
    try:
        nb.write_text(before.replace("ttl=timedelta(days=30)", "ttl=timedelta(days=40)"))
        assert "days=40" in nb.read_text()
        rec = run_json(d, "run", timeout=600)
        assert statuses(rec) == {**{s: "cached" for s in STAGES}, "examples": "done", "register": "done"}, statuses(rec)
        assert run_json(d, "features", "list")[0]["ttl"].startswith("40 days")
    finally:
        nb.write_text(before)


def test_reproduce_the_reference_run(reference):
    d, rec = reference
    p = run_mlnb(d, "reproduce", rec["run_id"], "--json", timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr
    rep = json.loads(p.stdout)
    by = {s["stage"]: s for s in rep["stages"]}
    for name in ("ingest", "examples", "validate", "features", "train", "evaluate"):  # the model's bytes too: skops files are canonical
        assert by[name]["equal"] and by[name]["key_equal"], by[name]
    assert not by["gate"]["deterministic"] and not by["register"]["deterministic"]
    assert rep["data_digest"]["equal"] and rep["source"] == {"from": "git", "commit": rec["git"]["commit"], "dirty": False}
