"A real `bentoml serve` of a bento built from the registry, spoken to over HTTP on 127.0.0.1."
import json, os, shutil, socket, subprocess, threading, time
from pathlib import Path
import httpx
import pytest
from conftest import reference_project, MLNB, ROOT, run_json, run_mlnb

from mlnb.data import generate_transactions, FEATURES


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    "The reference project: v1 champion, v2 challenger (manual promotion), a bento of v1 served with 30% canary traffic."
    d = tmp_path_factory.mktemp("serving")
    reference_project(d)
    run_json(d, "run", "--jobs", "2", timeout=600)
    run_json(d, "run", "-p", "learning_rate=0.1", env={"MLNB_PROMOTION": "manual"}, timeout=600)
    built = run_json(d, "build", timeout=300)
    port = free_port()
    env = {**os.environ, "MLNB_CANARY_SHARE": "0.3", "MLNB_MAX_BATCH": "50", "MLNB_RELOAD_INTERVAL": "1"}
    proc = subprocess.Popen([*MLNB, "--project", str(d), "serve", built["tag"], "--port", str(port)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if httpx.get(url + "/readyz", timeout=1).status_code == 200: break
        except httpx.HTTPError: pass
        if proc.poll() is not None: raise RuntimeError(proc.stdout.read())
        time.sleep(0.5)
    else:
        raise RuntimeError("service did not become ready")
    yield {"url": url, "project": d, "bento": built, "client": httpx.Client(base_url=url, timeout=30)}
    os.killpg(proc.pid, 15)
    try: proc.wait(timeout=30)
    except subprocess.TimeoutExpired: os.killpg(proc.pid, 9)


def records(n, seed=11):
    return generate_transactions(n, seed=seed)[FEATURES].to_dict("records")


def test_valid_single_and_batch(served):
    c = served["client"]
    r = c.post("/predict", json=records(1)[0])
    assert r.status_code == 200, r.text
    body = r.json()
    assert 0 <= body["score"] <= 1 and body["prediction"] in (0, 1) and body["model_version"] in (1, 2)
    assert r.headers["x-request-id"] == body["request_id"]
    r = c.post("/predict", json=records(20))
    assert r.status_code == 200 and len(r.json()["predictions"]) == 20


@pytest.mark.parametrize("mutate,status,needle", [
    (lambda r: {k: v for k, v in r.items() if k != "amount"}, 422, "field 'amount' is missing"),
    (lambda r: {**r, "hour": "noon"}, 422, "field 'hour' = \"noon\" is not accepted; expected an integer"),
    (lambda r: {**r, "amount": -3.5}, 422, "field 'amount' = -3.5 is not accepted; expected a number at least 0"),
    (lambda r: {**r, "channel": "fax"}, 422, "field 'channel' = \"fax\" is not accepted; expected one of chip, contactless, online, swipe"),
    (lambda r: {**r, "coupon": "X"}, 422, "field 'coupon' is not accepted; accepted fields: amount"),
])
def test_bad_records_get_4xx_naming_the_problem(served, mutate, status, needle):
    r = served["client"].post("/predict", json=mutate(records(1)[0]))
    assert r.status_code == status and needle in r.json()["error"], r.text


def test_bad_bodies(served):
    c = served["client"]
    r = c.post("/predict", content=b'{"amount": 1,', headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]
    r = c.post("/predict", json=[])
    assert r.status_code == 422 and "empty" in r.json()["error"]
    r = c.post("/predict", json=records(51))
    assert r.status_code == 413 and "51 records is over the batch limit of 50" in r.json()["error"]
    r = c.post("/predict", json=[records(1)[0], {**records(1)[0], "region": "mars"}])
    assert r.status_code == 422 and r.json()["error"].startswith("record 1: field 'region'")
    r = c.post("/predict", json="hello")
    assert r.status_code == 422 and "expected a JSON object" in r.json()["error"]


def test_metadata_health_metrics(served):
    c = served["client"]
    meta = c.get("/metadata").json()
    assert meta["model"] == "fraud-detector" and meta["bento"] == served["bento"]["tag"]
    assert meta["pipeline_run_id"] and meta["mlflow_run_id"] and len(meta["data_digest"]) == 64 and meta["trained_at"] > 0
    assert c.get("/healthz").status_code == 200 and c.get("/livez").status_code == 200 and c.get("/readyz").status_code == 200
    assert "bentoml_service_request" in c.get("/metrics").text


def test_prediction_log(served):
    rid = "test-log-123"
    served["client"].post("/predict", json=records(1)[0], headers={"x-request-id": rid})
    from mlnb.serving import read_prediction_log
    deadline = time.time() + 10
    while time.time() < deadline:
        df = read_prediction_log(served["project"] / ".mlnb/predictions")
        if len(df) and rid in set(df["request_id"]): break
        time.sleep(0.3)
    row = df[df["request_id"] == rid].iloc[0]
    assert row["model_version"] in (1, 2) and 0 <= row["score"] <= 1 and row["amount"] == records(1)[0]["amount"]


def test_canary_share_then_promotion_under_load(served):
    c = served["client"]
    variants = [c.post("/predict", json=r).json()["variant"] for r in records(400, seed=5)]
    share = variants.count("challenger") / len(variants)
    assert 0.3 - 0.1 < share < 0.3 + 0.1, share  # binomial sd for n=400 is 0.023: 4 sd either side
    # promote the challenger while requests keep coming: none fails, and answers switch to the new version
    stop, results = threading.Event(), []
    def load():
        with httpx.Client(base_url=served["url"], timeout=30) as lc:
            rec = records(1)[0]
            while not stop.is_set():
                try: r = lc.post("/predict", json=rec); results.append((time.time(), r.status_code, r.json().get("model_version")))
                except httpx.HTTPError as e: results.append((time.time(), type(e).__name__, None))
    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads: t.start()
    time.sleep(1.5)
    run_mlnb(served["project"], "promote", "2", "-m", "canary looked good", check=0)
    t_promoted = time.time()  # the alias has moved; the service follows the registry every second
    time.sleep(6)
    stop.set()
    for t in threads: t.join()
    assert results and all(code == 200 for _, code, _ in results), [r for r in results if r[1] != 200][:5]
    after = [v for t, _, v in results if t > t_promoted + 4]
    assert after and set(after) == {2}, "every answer after the switch comes from version 2"
    assert c.get("/metadata").json()["version"] == 2


def test_lineage_of_a_served_prediction_reaches_its_notebooks(served):
    c, d = served["client"], served["project"]
    r = c.post("/predict", json=records(1, seed=77)[0], headers={"x-request-id": "complaint-4711"})
    version = r.json()["model_version"]
    deadline = time.time() + 10
    while time.time() < deadline:  # the prediction log flushes every half second
        p = run_mlnb(d, "lineage", "complaint-4711", "--json")
        if p.returncode == 0: break
        time.sleep(0.5)
    ln = json.loads(p.stdout)
    assert ln["resolved_as"] == "prediction" and ln["prediction"]["request_id"] == "complaint-4711"
    assert ln["model"]["version"] == version and ln["prediction"]["score"] == r.json()["score"]
    run = ln["pipeline_run"]
    from mlnb.pipeline import load_run
    from mlnb.config import load_config
    rec = load_run(load_config(d), run["run_id"])
    assert ln["data_digest"] == rec["data_digest"] and ln["git"]["commit"] == rec["git"]["commit"] and len(ln["git"]["commit"]) == 40
    assert [s["stage"] for s in ln["stages"]] == ["ingest", "validate", "features", "train", "evaluate", "gate", "register"]
    for s in ln["stages"]:
        assert s["cache_key"] == rec["stages"][s["stage"]]["key"]
        nb = json.loads(Path(s["notebook"]).read_text())  # the executed notebook, as papermill left it
        assert Path(s["notebook"]).parent == Path(run["run_dir"]) / "notebooks"
        assert nb["metadata"]["papermill"]["exception"] is None and all(c["execution_count"] for c in nb["cells"] if c["cell_type"] == "code")
        injected = [c for c in nb["cells"] if "injected-parameters" in c["metadata"].get("tags", [])]
        assert injected and all(f"{k} = " in "".join(injected[0]["source"]) for k in s["params"])
    model_version = json.loads(Path(next(x for x in ln["stages"] if x["stage"] == "register")["notebook"]).read_text())
    assert f"'version': {version}" in json.dumps(model_version)  # the register notebook printed the version it registered
    assert [e["kind"] for e in ln["events"]][:3] == ["model.registered", "gate.decision", "model.alias_set" if version == 2 else "model.promoted"]
    text = run_mlnb(d, "lineage", "complaint-4711", check=0).stdout
    assert text.startswith("prediction complaint-4711") and "notebooks/train.ipynb" in text and f"git commit {rec['git']['commit']}" in text
    # the id of a batch request resolves to its records
    c.post("/predict/batch", json=records(3, seed=78), headers={"x-request-id": "batch-17"})
    time.sleep(1.5)
    assert run_json(d, "lineage", "batch-17")["prediction"]["request_id"] == "batch-17:0"
    # the service's /metadata starts the same chain, and a bento tag resolves too
    meta = c.get("/metadata").json()
    assert meta["lineage"].startswith("every response carries x-request-id") and meta["model_card"] == "/card"
    by_bento = run_json(d, "lineage", served["bento"]["tag"])
    assert by_bento["resolved_as"] == "bento" and by_bento["model"]["version"] == 1
    p = run_mlnb(d, "lineage", "no-such-thing", check=1)
    assert "'no-such-thing' is not a version, alias, bento or logged prediction of model 'fraud-detector'; accepted: a version number" in p.stderr


def test_model_card_ships_in_the_bento(served):
    html = served["client"].get("/card")
    assert html.status_code == 200 and html.headers["content-type"].startswith("text/html")
    assert "<h2>Intended use</h2>" in html.text and "<h2>Fairness by <code>age_band</code></h2>" in html.text and "<table>" in html.text
    src = Path(served["bento"]["path"]) / "src"
    assert "## Gates" in (src / "model_card.md").read_text()
