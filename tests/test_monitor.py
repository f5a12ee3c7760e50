"Drift verdicts, false positives, refused windows, and the whole loop with real processes."
import json, os, shutil, signal, subprocess, time
from pathlib import Path
import httpx
import numpy as np
import pandas as pd
import pytest
from conftest import reference_project_reusing, MLNB, ROOT, run_json, run_mlnb

from mlnb.data import generate_transactions, FEATURES, CATEGORICAL
from mlnb.errors import ValidationError
from mlnb.monitor import detect_drift, drift_settings, labelled_window, numeric_drift
from mlnb.tasks import Task


def test_known_drift_and_no_drift():
    ref = generate_transactions(8000, seed=1)
    for seed in (2, 3, 4):
        assert not detect_drift(ref, generate_transactions(3000, seed=seed), FEATURES, CATEGORICAL)["dataset_drift"]
        moved = detect_drift(ref, generate_transactions(3000, seed=seed, drift=0.8), FEATURES, CATEGORICAL)
        assert moved["dataset_drift"] and {"amount", "channel", "merchant_category"} <= set(moved["drifted_columns"])


def test_large_reference_uses_distances():
    ref = generate_transactions(30000, seed=1)
    rep = detect_drift(ref, generate_transactions(3000, seed=2, drift=1.0), FEATURES, CATEGORICAL)
    tests = {c["column"]: c["test"] for c in rep["columns"]}
    assert tests["amount"] == "wasserstein_normed" and tests["channel"] == "jensenshannon" and rep["dataset_drift"]
    assert not detect_drift(ref, generate_transactions(3000, seed=3), FEATURES, CATEGORICAL)["dataset_drift"]


def test_false_positive_rate_on_identical_distributions():
    s = drift_settings()
    alpha, trials, flagged, datasets = s["drift_alpha"], 0, 0, 0
    for seed in range(60):
        rng = np.random.default_rng(seed)
        ref, cur = rng.normal(5, 2, (2000, 5)), rng.normal(5, 2, (1000, 5))
        res = numeric_drift(ref, cur, list("abcde"), s)
        trials += len(res); flagged += sum(r["drifted"] for r in res)
        datasets += sum(r["drifted"] for r in res) / len(res) >= s["drift_share"]
    rate = flagged / trials
    tolerance = 2 * np.sqrt(alpha * (1 - alpha) / trials)  # two binomial standard deviations over 300 tests
    assert rate <= alpha + tolerance, f"per-column false-positive rate {rate:.3f} over {trials} tests, alpha {alpha}"
    assert datasets / 60 <= alpha, f"dataset-level false alarms {datasets}/60"


def test_windows_it_cannot_judge_say_why():
    ref = generate_transactions(2000, seed=1)
    with pytest.raises(ValidationError, match="the current window has 0 rows; at least 100"): detect_drift(ref, ref.head(0), FEATURES, CATEGORICAL)
    with pytest.raises(ValidationError, match="has 50 rows"): detect_drift(ref, ref.head(50), FEATURES, CATEGORICAL)
    with pytest.raises(ValidationError, match=r"lacks column\(s\) channel, region"): detect_drift(ref, ref.drop(columns=["channel", "region"]), FEATURES, CATEGORICAL)
    cur = generate_transactions(500, seed=2)
    cur.loc[:20, "distance_km"] = np.nan
    cur.loc[:3, "region"] = "atlantis"
    rep = detect_drift(ref, cur, FEATURES, CATEGORICAL)
    col = {c["column"]: c for c in rep["columns"]}
    assert col["distance_km"]["missing_values"] == 21 and col["region"]["unseen"] == ["atlantis"] and col["region"]["drifted"]


def test_a_retraining_window_follows_the_labels_not_the_order_requests_were_logged():
    """Concurrent requests are logged in the order they finished; the pipeline splits by position, so the window must
    not depend on that order: the same labels give the same rows in the same order, unlabelled and repeated logs left out."""
    rows = generate_transactions(400, seed=5)
    logged = rows[FEATURES].assign(request_id=[f"r{i:03d}" for i in range(400)], score=0.5)
    labels = logged[["request_id"]].assign(is_fraud=rows["is_fraud"].to_numpy()).sample(frac=1.0, random_state=3).head(300)
    task = Task("binary", "is_fraud", tuple(FEATURES), ("tx_id",))
    a = labelled_window(task, logged, labels, FEATURES)
    for seed in (1, 2):  # the same log, finished in other orders, one request logged twice
        shuffled = logged.sample(frac=1.0, random_state=seed)
        b = labelled_window(task, pd.concat([shuffled, shuffled.head(5)]), labels, FEATURES)
        pd.testing.assert_frame_equal(a, b)
    assert list(a.columns) == ["tx_id", *FEATURES, "is_fraud"] and a["tx_id"].tolist() == labels["request_id"].tolist()
    assert a["amount"].tolist() == rows.set_index(logged["request_id"]).loc[labels["request_id"], "amount"].tolist()
    with pytest.raises(ValidationError, match="no logged request has a label"):
        labelled_window(task, logged, labels.assign(request_id="other"), FEATURES)


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.timeout(1800)  # three pipeline runs (the first, a retraining the gates refuse, one they pass) on a shared machine
def test_full_loop_serve_simulate_monitor_retrain(tmp_path, reference_run):
    d = reference_project_reusing(tmp_path / "proj", reference_run)
    run_json(d, "run", "--jobs", "2", timeout=600)
    built = run_json(d, "build", timeout=300)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([*MLNB, "--project", str(d), "serve", built["tag"], "--port", str(port)], env={**os.environ, "MLNB_RELOAD_INTERVAL": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if httpx.get(url + "/readyz", timeout=1).status_code == 200: break
            except httpx.HTTPError: time.sleep(0.5)
        # production traffic like the training data: no drift, exit 0
        def rows(n, seed, drift=0.0):  # production-like traffic from the reference example's generator, as a user's file
            f = tmp_path / f"traffic-{seed}.parquet"; generate_transactions(n, seed=seed, drift=drift).to_parquet(f); return str(f)
        run_mlnb(d, "simulate", "--url", url, "--rows", "600", "--data", rows(600, 500), check=0)
        time.sleep(1.5)  # the prediction log flushes every half second
        calm = run_mlnb(d, "monitor", "--json", check=0)
        assert json.loads(calm.stdout)["alert"] is False
        # drifted traffic, then its labels: drift detected (exit 3), an incident opens, and --retrain trains a new champion
        run_mlnb(d, "simulate", "--url", url, "--rows", "3000", "--data", rows(3000, 501, 0.9), "--labels", str(d / "labels.jsonl"), check=0)
        time.sleep(1.5)
        # a retrained candidate the gates refuse: the verdict, report and incident come first, then retraining's progress,
        # then one line naming the stage, why and its executed notebook; the drift still exits 3
        p = subprocess.run([*MLNB, "--project", str(d), "monitor", "--window", "3000", "--labels", str(d / "labels.jsonl"), "--retrain"],
                           env={**{k: v for k, v in os.environ.items() if k != "MLNB_PROJECT"}, "MLNB_GATE_MIN_ROC_AUC": "0.999"}, cwd=d, timeout=900, text=True,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # one stream: the order a person sees
        assert p.returncode == 3, p.stdout
        lines = p.stdout.splitlines()
        assert lines[0].startswith("model fraud-detector v1: DRIFT (") and "incident 1: open" in lines, p.stdout
        report = next(x for x in lines if x.startswith("report: "))
        started = next(i for i, x in enumerate(lines) if x.startswith("retraining on ") and "labelled rows (.mlnb/retrain/window-" in x)
        assert lines.index(report) < lines.index("incident 1: open") < started
        assert any(" ingest " in x and "✓ ran" in x for x in lines[started:]) and any(" register " in x and "✗ failed" in x for x in lines[started:])
        failed = lines[-1]
        assert failed.startswith("retraining failed in stage 'register' (run ") and "GateFailed: " in failed and "roc_auc" in failed, failed
        notebook = failed.split("; executed notebook: ")[1]
        assert notebook.endswith("register.ipynb") and (d / notebook).exists(), failed
        assert Path(report.split(": ", 1)[1]).exists()
        evs = run_json(d, "audit")
        seq = {e["kind"]: e["seq"] for e in evs}  # the newest of each kind
        assert seq["drift.alert"] < seq["incident.opened"] < seq["retrain.started"] < seq["retrain.finished"]
        fin = [e for e in evs if e["kind"] == "retrain.finished"][-1]
        assert fin["data"]["status"] == "failed" and fin["refs"]["stage"] == "register" and fin["data"]["notebook"].endswith("register.ipynb")
        view = run_mlnb(d, "audit", "--kind", "retrain", check=0).stdout.splitlines()
        assert " FAILED " in view[-1] and "GateFailed: " in view[-1], view
        # the same with the project's gates: the candidate becomes champion; --json carries what happened to it
        p = run_mlnb(d, "monitor", "--window", "3000", "--labels", str(d / "labels.jsonl"), "--retrain", "--json", timeout=900)
        assert p.returncode == 3, p.stderr
        res = json.loads(p.stdout)
        assert res["report"]["dataset_drift"] and res["incident"]["status"] == "open"
        assert Path(res["paths"]["html"]).exists() and "<svg" in Path(res["paths"]["html"]).read_text()
        assert res["report"]["performance"]["rows"] > 2000 and res["report"]["performance"]["metric"] == "roc_auc"
        assert res["retrain"].get("champion") == 2, res["retrain"]
        assert res["retrain"]["status"] == "done" and res["retrain"]["model_version"] == 2 and res["retrain"]["action"] == "promoted", res["retrain"]
        assert f"retrained: run {res['retrain']['run_id']}; model v2: champion" in p.stderr and "retraining on " in p.stderr
        # the running service follows the new champion
        deadline = time.time() + 30
        while time.time() < deadline and httpx.get(url + "/metadata").json()["version"] != 2: time.sleep(0.5)
        r = httpx.post(url + "/predict", json=generate_transactions(1, seed=9, drift=0.9)[FEATURES].to_dict("records")[0])
        assert r.json()["model_version"] == 2
        # traffic like the new champion's training data: no drift, and the incident closes
        run_mlnb(d, "simulate", "--url", url, "--rows", "800", "--data", rows(800, 502, 0.9), check=0)
        time.sleep(1.5)
        p = run_mlnb(d, "monitor", "--json", check=0)
        res = json.loads(p.stdout)
        assert res["report"]["model_version"] == 2 and res["alert"] is False
        assert res["incident"]["status"] == "closed" and res["incident"]["closed_by_version"] == 2
        # the delivery report, from the audit log and the registry
        rep = run_json(d, "report")
        m = rep["metrics"]
        assert m["deployments"]["promotions"] == 2 and m["deployments"]["rollbacks"] == 0 and m["change_failure_rate"] == 0
        first, second = m["deployments"]["list"]
        assert first["change"].startswith("commit ") and first["lead_time_s"] > 0  # v1: from the project's first commit
        assert second["change"] == "new data or parameters (same code)" and 0 < second["lead_time_s"] < 900  # v2: the retraining run
        assert m["incidents"]["count"] == 1 and m["incidents"]["open"] == 0 and m["incidents"]["mean_time_to_resolve_s"] > 0
        assert [a["version"] for a in m["accuracy"]] == [1, 2] and all(a["metric"] == "roc_auc" and a["holdout"] > 0.5 for a in m["accuracy"])
        assert m["accuracy"][0]["live"] is not None  # the labelled check of v1's drifted traffic
        page = Path(rep["paths"]["html"]).read_text()
        assert page.count("<svg") == 4 and "change failure rate" in page
        kinds = {e["kind"] for e in run_json(d, "audit")}
        assert {"run.finished", "stage.finished", "gate.decision", "model.promoted", "bento.built", "deploy.started", "deploy.switched",
                "monitor.checked", "drift.alert", "incident.opened", "retrain.started", "retrain.finished", "incident.closed"} <= kinds, kinds
        assert run_mlnb(d, "audit", "verify", check=0).stdout.rstrip().endswith("chain intact")
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try: proc.wait(timeout=30)
        except subprocess.TimeoutExpired: os.killpg(proc.pid, signal.SIGKILL)


def test_monitor_errors_are_one_line(chain):
    p = run_mlnb(chain, "monitor", check=1)
    assert p.stderr.strip().startswith("mlnb: error: no registered model 'test-model'")
    p = run_mlnb(chain, "monitor", "--retrain", check=2)  # before any check: retraining needs the labelled window
    assert "--retrain needs --labels FILE: the new training data is the labelled window" in p.stderr
