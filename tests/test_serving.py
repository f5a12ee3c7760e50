"A real `bentoml serve` of a bento built from the registry, spoken to over HTTP on 127.0.0.1."
import os, shutil, socket, subprocess, threading, time
import httpx
import pytest
from conftest import MLNB, ROOT, run_json, run_mlnb

from mlnb.data import generate_transactions, FEATURES


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    "The reference project: v1 champion, v2 challenger (manual promotion), a bento of v1 served with 30% canary traffic."
    d = tmp_path_factory.mktemp("serving")
    shutil.copy(ROOT / "settings.ini", d / "settings.ini")
    shutil.copytree(ROOT / "nbs/pipeline", d / "nbs/pipeline")
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
