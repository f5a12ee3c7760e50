"Gates, promotion, rollback and the alias history on the reference pipeline (real kernels, real MLflow registry)."
import json, shutil
from pathlib import Path
import pytest
from conftest import git, reference_project_reusing, ROOT, run_json, run_mlnb, statuses

pytestmark = pytest.mark.slow  # one project built up test after test: a registered model, a bento, a served service

SMALL: list = []  # the full reference data: fairness gates need enough positives per group


@pytest.fixture(scope="module")
def project(tmp_path_factory, reference_run):
    "The reference project with no model yet; its cache starts as the session's reference run left it."
    return reference_project_reusing(tmp_path_factory.mktemp("registry"), reference_run)


def models(d):
    return run_json(d, "models")


def aliases(d):
    return {v["version"]: v["aliases"] for v in models(d)["versions"]}


def test_auto_promotion_then_rollback_and_manual_promote(project):
    rec = run_json(project, "run", *SMALL, timeout=600)
    assert statuses(rec)["register"] == "done"
    decision = json.loads((Path(rec["stages"]["register"]["entry"]) / "promotion.json").read_text())
    assert decision["action"] == "promoted" and decision["passed"]
    gate_names = {g["gate"] for g in decision["gates"]}
    assert {"min_roc_auc", "min_pr_auc", "fairness_demographic_parity", "fairness_equalized_odds", "max_p95_latency", "max_model_size"} <= gate_names
    assert aliases(project) == {1: ["champion"]}
    assert "model 'fraud-detector' has no version 99; versions: 1" in run_mlnb(project, "promote", "99", "-m", "x", check=1).stderr

    # a second candidate: compared with the champion on the same holdout, then promoted
    rec2 = run_json(project, "run", *SMALL, "-p", "learning_rate=0.1", timeout=600)
    d2 = json.loads((Path(rec2["stages"]["register"]["entry"]) / "promotion.json").read_text())
    assert "no_regression" in {g["gate"] for g in d2["gates"]}
    assert aliases(project) == {2: ["champion"], 1: []}

    out = run_mlnb(project, "rollback", "-m", "complaints from the fraud team", check=0)
    assert "champion: 2 -> 1" in out.stdout
    assert aliases(project) == {2: [], 1: ["champion"]}
    assert "no earlier champion" in run_mlnb(project, "rollback", "-m", "again", check=1).stderr

    run_mlnb(project, "promote", "2", "-m", "fixed upstream data", env={"MLNB_ACTOR": "alice"}, check=0)
    assert aliases(project) == {2: ["champion"], 1: []}
    hist = models(project)["history"]
    assert [(e["alias"], e["from"], e["to"], e["kind"]) for e in hist] == [
        ("champion", None, 1, "promote"), ("champion", 1, 2, "promote"), ("champion", 2, 1, "rollback"), ("champion", 1, 2, "promote")]
    assert hist[-1]["who"] == "alice" and hist[-1]["why"] == "fixed upstream data" and hist[2]["why"] == "complaints from the fraud team"
    text = run_mlnb(project, "models", "--history", check=0).stdout
    assert "v2" in text and "champion" in text and "by alice: fixed upstream data" in text
    # gc keeps what the champion's run used, even when no recent run does; v1 holds no alias, so its own entries may go
    dry = run_json(project, "gc", "--keep-runs", "0", "--dry-run")
    assert dry["runs_kept"] == {rec2["run_id"]: "the run that registered fraud-detector v2, which holds an alias"}, dry["runs_kept"]
    gone = {(r["stage"], r["entry"]) for r in dry["removed"]}
    assert ("register", Path(rec["stages"]["register"]["entry"]).name) in gone and ("train", Path(rec["stages"]["train"]["entry"]).name) in gone
    assert not {(s, Path(st["entry"]).name) for s, st in rec2["stages"].items()} & gone


def test_registry_views_and_moves_read_the_store_without_mlflow_and_agree_with_it(project):
    """`models`, `promote`, `rollback` read and write MLflow's SQLite tables with sqlite3 (no `import mlflow`): what they
    see is what MLflow's own client sees, and what they write MLflow resolves."""
    import subprocess, sys
    script = ("import sys; from mlnb.cli import main\n"
              "try: main(sys.argv[1:])\n"
              "except SystemExit as e: assert not e.code, e.code\n"
              "assert 'mlflow' not in sys.modules, 'imported mlflow'")
    env = {**__import__("os").environ, "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true", "MLNB_ACTOR": "bob"}
    for args in (["models", "--history"], ["rollback", "-m", "fast path"], ["promote", "2", "-m", "fast path back"], ["card"]):
        p = subprocess.run([sys.executable, "-c", script, *args], cwd=project, env=env, capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, (args, p.stderr[-2000:])
    import mlflow
    from mlnb.config import load_config
    from mlnb import tracking
    cfg = load_config(project)
    client = mlflow.MlflowClient(cfg.tracking_uri, cfg.tracking_uri)
    fast, slow = tracking._SqlRegistry(tracking._sqlite_store(cfg.tracking_uri)), tracking._ClientRegistry(client)
    name = cfg.model_name
    assert fast.model(name) == slow.model(name) and fast.model(name)["aliases"] == {"champion": 2}
    plain = lambda vs: sorted(({k: v for k, v in x.items() if k != "location"} for x in vs), key=lambda x: x["version"])
    assert plain(fast.versions(name)) == plain(slow.versions(name)) and len(fast.versions(name)) == 2
    assert int(client.get_model_version_by_alias(name, "champion").version) == 2  # MLflow resolves the alias mlnb moved
    desc = client.get_model_version(name, "1").description  # the description MLflow shows was rewritten with the moves
    assert "moved away, to v2 (promote by bob: fast path back)" in desc and "(rollback by bob: fast path)" in desc
    moves = [e for e in tracking.alias_history(cfg) if e["who"] == "bob"]
    assert [(e["from"], e["to"], e["kind"]) for e in moves] == [(2, 1, "rollback"), (1, 2, "promote")]
    # a file whose tables mlnb does not know is left to MLflow's client; so is anything that is not SQLite
    other = project / "other.db"
    import sqlite3
    with sqlite3.connect(other) as db: db.execute("CREATE TABLE registered_models (name TEXT)")
    assert tracking._sqlite_store(f"sqlite:///{other}") is None and tracking._sqlite_store("http://127.0.0.1:5000") is None
    assert tracking._sqlite_store(cfg.tracking_uri) is not None
    # an artifact path cannot leave the version's artifact folder
    assert tracking.version_artifact_path(cfg, 2, "holdout.parquet").is_file()
    assert tracking.version_artifact_path(cfg, 2, "../../../mlflow.db") is None


def test_failed_gates_block_promotion_with_one_reason_each(project):
    before = aliases(project)
    p = run_mlnb(project, "run", *SMALL, "-p", "max_iter=20", env={"MLNB_GATE_MIN_ROC_AUC": "0.999", "MLNB_GATE_MAX_DEMOGRAPHIC_PARITY_DIFFERENCE": "0.0001"}, timeout=600)
    assert p.returncode == 1, p.stderr
    err = p.stderr.strip().splitlines()[-1]
    assert "stage 'register' failed" in err and "GateFailed" in err and "promotion blocked" in err
    assert "min_roc_auc FAILED" in err and "fairness_demographic_parity FAILED" in err
    after = models(project)["versions"]
    new = [v for v in after if v["version"] not in before][0]
    assert new["aliases"] == [] and new["tags"]["mlnb.gates.passed"] == "false"
    assert {v: a for v, a in aliases(project).items() if v in before} == before, "the champion did not move"
    # a manual promotion of the failed candidate is refused, naming the failed gates
    p = run_mlnb(project, "promote", str(new["version"]), "-m", "ship it", check=1)
    assert f"promotion of version {new['version']} refused: min_roc_auc FAILED" in p.stderr
    # rerunning the same failing candidate does not register it twice
    run_mlnb(project, "run", *SMALL, "-p", "max_iter=20", env={"MLNB_GATE_MIN_ROC_AUC": "0.999", "MLNB_GATE_MAX_DEMOGRAPHIC_PARITY_DIFFERENCE": "0.0001"}, timeout=600, check=1)
    assert len(models(project)["versions"]) == len(after)


def test_registry_errors_name_what_exists(project):
    p = run_mlnb(project, "promote", "1")
    assert p.returncode == 2 and "--reason" in p.stderr


def test_contract_commands(project, tmp_path):
    from mlnb.data import generate_transactions, FEATURES
    df = generate_transactions(500, seed=5)[FEATURES]
    df.to_parquet(tmp_path / "good.parquet")
    run_mlnb(project, "contract", "infer", str(tmp_path / "good.parquet"), str(tmp_path / "c.yaml"), check=0)
    assert "ok" in run_mlnb(project, "contract", "check", str(tmp_path / "good.parquet"), str(tmp_path / "c.yaml"), check=0).stdout
    bad = df.copy(); bad.loc[:9, "channel"] = "fax"; bad.loc[:2, "amount"] = -1.0
    bad.to_csv(tmp_path / "bad.csv", index=False)
    p = run_mlnb(project, "contract", "check", str(tmp_path / "bad.csv"), str(tmp_path / "c.yaml"), check=1)
    assert "channel: isin(" in p.stdout and "failed for 10 row(s) (e.g. fax" in p.stdout and f"amount: greater_than_or_equal_to({df.amount.min()}) failed for 3 row(s)" in p.stdout  # the observed minimum


def test_validate_stage_reports_contract_violations(project):
    nb = project / "nbs/pipeline/contract.yaml"
    original = nb.read_text()
    nb.write_text(original.replace("    - online\n", ""))  # the reviewed contract no longer allows online payments
    try:
        p = run_mlnb(project, "run", *SMALL, timeout=600, check=1)
        err = p.stderr.strip().splitlines()[-1]
        assert "stage 'validate' failed" in err and "channel: isin(" in err and "row(s) (e.g. online)" in err, p.stderr[-4000:]
    finally:
        nb.write_text(original)


def test_policy_refusals_are_explained_and_audited(project):
    champion = next(v for v, a in aliases(project).items() if "champion" in a)
    # who may change the champion by hand
    allow = {"MLNB_POLICY_PROMOTERS": "alice, bob"}
    p = run_mlnb(project, "rollback", "-m", "I think v1 was better", env={**allow, "MLNB_ACTOR": "mallory"}, check=1)
    assert "mlnb: error: roll back refused: mallory may not roll back by hand; allowed: alice, bob (policy_promoters in settings.ini)" in p.stderr
    # a champion must come from a clean git tree: a candidate trained with uncommitted changes stays challenger
    nb = project / "nbs/pipeline/train.ipynb"
    original = nb.read_text()
    nb.write_text(original.replace("random_state=seed", "random_state=seed + 1"))
    try:
        rec = run_json(project, "run", env={"MLNB_ACTOR": "carol"}, timeout=600)
    finally:
        nb.write_text(original)
    decision = json.loads((Path(rec["stages"]["register"]["entry"]) / "promotion.json").read_text())
    assert rec["git"]["dirty"] is True and decision["passed"] and decision["action"] == "challenger"
    assert "a champion must come from a clean git tree (policy_champion_clean_git = true); it was trained from commit" in decision["policy_refusals"][0]
    new = decision["version"]
    assert aliases(project)[new] == ["challenger"] and aliases(project)[champion] == ["champion"]
    # and it cannot be promoted by hand either, not even by someone who may promote
    p = run_mlnb(project, "promote", str(new), "-m", "looks fine", env={**allow, "MLNB_ACTOR": "alice"}, check=1)
    assert f"promotion of version {new} refused: a champion must come from a clean git tree" in p.stderr
    assert "uncommitted changes" in run_mlnb(project, "card", str(new), check=0).stdout  # the card says so too
    # every refusal is in the audit log, with who and why
    refused = run_json(project, "audit", "--kind", "policy.refused")
    assert [(e["actor"], e["data"]["action"]) for e in refused[-3:]] == [("mallory", "roll back"), ("carol", "automatic promotion"), ("alice", "promotion")]
    assert "uncommitted changes" in refused[-1]["data"]["reasons"][0]
    text = run_mlnb(project, "audit", "--kind", "policy", check=0).stdout
    assert "mallory" in text and "may not roll back by hand" in text
    # a policy that names a gate that does not exist is a configuration error that says which gates there are
    p = run_mlnb(project, "promote", str(new), "-m", "x", env={"MLNB_POLICY_REQUIRED_GATES": "min_auc"}, check=1)
    assert "policy_required_gates names unknown gate(s) min_auc (did you mean min_roc_auc?); gates: min_roc_auc, min_pr_auc, min_f1" in p.stderr
    assert run_mlnb(project, "audit", "verify", check=0).stdout.rstrip().endswith("chain intact")
