"A real `bentoml serve` of a bento built from the registry, spoken to over HTTP on 127.0.0.1."
import json, os, re, shutil, socket, subprocess, sys, textwrap, threading, time
from pathlib import Path
import httpx
import pytest
from conftest import reference_project_reusing, MLNB, ROOT, run_json, run_mlnb, wait_for

pytestmark = pytest.mark.slow  # one project built up test after test: a registered model, a bento, a served service

from mlnb.data import generate_transactions, FEATURES


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory, reference_run):
    "The reference project: v1 champion, v2 challenger (manual promotion), a bento of v1 served with 30% canary traffic."
    d = reference_project_reusing(tmp_path_factory.mktemp("serving"), reference_run)
    run_json(d, "run", "--jobs", "2", timeout=600)
    run_json(d, "run", "-p", "learning_rate=0.1", env={"MLNB_PROMOTION": "manual"}, timeout=600)
    built = run_json(d, "build", timeout=300)
    port = free_port()
    env = {**os.environ, "MLNB_CANARY_SHARE": "0.3", "MLNB_MAX_BATCH": "50", "MLNB_RELOAD_INTERVAL": "1"}
    log = d / "serve.log"  # the server's output, read by the tests (a pipe nobody reads would fill up and block it)
    proc = subprocess.Popen([*MLNB, "--project", str(d), "serve", built["tag"], "--port", str(port)], env=env,
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, text=True, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if httpx.get(url + "/readyz", timeout=1).status_code == 200: break
        except httpx.HTTPError: pass
        if proc.poll() is not None: raise RuntimeError(log.read_text())
        time.sleep(0.5)
    else:
        raise RuntimeError("service did not become ready")
    yield {"url": url, "project": d, "bento": built, "client": httpx.Client(base_url=url, timeout=30), "proc": proc, "log": log}
    os.killpg(proc.pid, 15)
    try: proc.wait(timeout=30)
    except subprocess.TimeoutExpired: os.killpg(proc.pid, 9)


def another_server(served, tmp_path, env):
    "A second `mlnb serve` of the fixture's bento with its own environment, on a free port, once it answers (its output in serve.log)."
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([*MLNB, "--project", str(served["project"]), "serve", served["bento"]["tag"], "--port", str(port)], env=env,
                            stdout=open(tmp_path / "serve.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if httpx.get(url + "/readyz", timeout=1).status_code == 200: return proc, url
        except httpx.HTTPError: pass
        if proc.poll() is not None: raise AssertionError((tmp_path / "serve.log").read_text())
        time.sleep(0.5)
    os.killpg(proc.pid, 9)
    raise AssertionError(f"the second server did not answer within 120 s:\n{(tmp_path / 'serve.log').read_text()[-3000:]}")


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


def test_hostile_bodies_get_small_fast_4xx(served):
    "Issue 10, point 5: each of these was a 500, a 200, or a 20 MB answer."
    c, rec, J = served["client"], records(1)[0], {"content-type": "application/json"}
    def post(body, headers=J):
        t = time.perf_counter()
        r = c.post("/predict", content=body, headers=headers)
        return r.status_code, r.json()["error"], len(r.content), time.perf_counter() - t
    # 10,000 nested [ was a RecursionError: now a 400 that says why
    status, msg, _, took = post(b"[" * 10_000)
    assert status == 400 and "nests more than 20 levels deep" in msg and took < 1
    # no size limit: now 413 from the Content-Length, before the 20 MB are read, and the answer is small
    status, msg, size, took = post(json.dumps({**rec, "channel": "x" * 20_000_000}).encode())
    assert status == 413 and "over the limit of 1048576 bytes (max_request_bytes)" in msg and size < 300 and took < 5
    def streamed():  # without a Content-Length: refused once it has grown past the limit
        yield b"["
        for _ in range(40): yield b" " * 65536
        yield b"]"
    assert post(streamed())[:1] == (413,)
    # a big bad value is quoted in 40 characters, not echoed back
    status, msg, size, _ = post(json.dumps({**rec, "channel": "x" * 500_000}).encode())
    assert status == 422 and size < 300 and msg == 'field \'channel\' = "' + "x" * 39 + '\u2026 is not accepted; expected one of chip, contactless, online, swipe'
    # strict JSON types: true and "120.5" are not numbers (they were accepted with 200); an integer is
    for bad in (True, "120.5"):
        status, msg, *_ = post(json.dumps({**rec, "amount": bad}).encode())
        assert status == 422 and msg.startswith(f"field 'amount' = {json.dumps(bad)} is not accepted; expected a number at least 0"), msg
        assert "(a JSON number, not a string or true/false)" in msg
    assert c.post("/predict", json={**rec, "amount": 120}).status_code == 200
    # a text/plain body (was accepted with 200), and one without a Content-Type: 415 naming what is accepted
    status, msg, *_ = post(json.dumps(rec).encode(), {"content-type": "text/plain"})
    assert (status, msg) == (415, 'Content-Type "text/plain" is not accepted; send the records as JSON, with Content-Type: application/json (UTF-8)')
    assert post(json.dumps(rec).encode(), {})[0] == 415
    # NaN and Infinity are not JSON; bytes that are not UTF-8 are not JSON text
    assert post(json.dumps({**rec, "amount": float("nan")}).encode())[:2] == (400, "NaN is not valid JSON; send finite numbers")
    assert post(json.dumps({**rec, "amount": float("inf")}).encode())[0] == 400
    assert post(b'{"channel": "\xff"}')[:2] == (400, "the request body is not UTF-8 (byte 13: invalid start byte); JSON is sent as UTF-8")


def test_metadata_health_metrics(served):
    c = served["client"]
    meta = c.get("/metadata").json()
    assert meta["model"] == "fraud-detector" and meta["bento"] == served["bento"]["tag"]
    assert meta["pipeline_run_id"] and meta["mlflow_run_id"] and len(meta["data_digest"]) == 64
    from datetime import datetime, timezone  # issue 11: trained_at was an epoch float
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", meta["trained_at"]), meta["trained_at"]
    assert abs((datetime.now(timezone.utc) - datetime.fromisoformat(meta["trained_at"].replace("Z", "+00:00"))).total_seconds()) < 3600
    assert c.get("/healthz").status_code == 200 and c.get("/livez").status_code == 200 and c.get("/readyz").status_code == 200
    assert "bentoml_service_request" in c.get("/metrics").text


def openapi_of(served):
    r = served["client"].get("/docs.json")
    assert r.status_code == 200 and r.headers["content-type"] == "application/json", r.text[:300]
    return r.json()


def test_docs_describe_the_model_and_its_contract(served):
    "Issue 11: the docs page was BentoML's default text (badges from the internet), and /predict showed no request schema and a string answer."
    c = served["client"]
    wait_for(lambda: c.get("/metadata").json()["challenger"] == 2)  # the canary's challenger is loaded just after the service is ready
    doc = openapi_of(served)
    about = doc["info"]["description"]
    assert doc["info"]["title"] == "fraud-detector: model service" and doc["info"]["version"] == "model version 1"
    assert about.startswith("A **binary classification** model of `is_fraud`") and "**Answering: version 1** of `fraud-detector`, the registry's `champion`" in about
    assert "30% of the requests go to the `challenger`, version 2" in about and "[`/metadata`](./metadata)" in about
    assert "`score` (the probability of `1`)" in about and "img.shields.io" not in json.dumps(doc) and "bentoml.com" not in json.dumps(doc)
    post = doc["paths"]["/predict"]["post"]
    body = post["requestBody"]["content"]["application/json"]
    one, many = body["schema"]["oneOf"]
    from mlnb.serving import bento_settings
    from mlnb.config import load_config
    contract = bento_settings(load_config(served["project"]), served["bento"]["tag"])["fields"]
    # the reference serves its account features from the store: they may be left out, then the record gives account_id
    assert list(one["properties"]) == [*contract, "account_id"] and list(contract) == FEATURES and one["additionalProperties"] is False
    assert one["required"] == [f for f in FEATURES if f not in ACCOUNT_FEATURES] and one["properties"]["account_id"]["type"] == "integer"
    assert one["properties"]["channel"]["enum"] == contract["channel"]["allowed"] and one["properties"]["hour"]["type"] == "integer"
    assert (one["properties"]["amount"]["minimum"], one["properties"]["amount"]["maximum"]) == (contract["amount"]["ge"], contract["amount"]["le"])
    assert many["items"] == one and many["maxItems"] == 50  # MLNB_MAX_BATCH of the fixture
    answer = post["responses"]["200"]["content"]["application/json"]["schema"]["oneOf"][0]["properties"]
    assert answer["score"]["description"] == "the probability that `is_fraud` is `1`" and answer["prediction"]["enum"] == [0, 1]
    assert set(post["responses"]) == {"200", "400", "413", "415", "422"}
    # the examples are what the service accepts
    r = c.post("/predict", json=body["example"])
    assert r.status_code == 200 and 0 <= r.json()["score"] <= 1, r.text
    batch = doc["paths"]["/predict/batch"]["post"]["requestBody"]["content"]["application/json"]["example"]
    r = c.post("/predict/batch", json=batch)
    assert r.status_code == 200 and len(r.json()["predictions"]) == len(batch) == 2, r.text
    refusal = post["responses"]["422"]["content"]["application/json"]["example"]["error"]
    assert c.post("/predict", json={**body["example"], "amount": "?"}).json()["error"] == refusal
    assert c.get("/openapi.json").json() == doc and c.get("/metadata").json()["example"] == body["example"]
    # the page is the service's own, and loads nothing from the internet
    for path in ("/", "/docs"):
        page = c.get(path)
        assert page.status_code == 200 and "<title>fraud-detector: model service</title>" in page.text and "./docs.json" in page.text
        assert "https://" not in page.text and "googletagmanager" not in page.text
    for asset in ("swagger-ui.css", "swagger-ui-bundle.js"):
        assert c.get(f"/docs-assets/{asset}").status_code == 200


def scrape(client) -> dict:
    "The samples of `/metrics` whose name starts with mlnb_, as {(name, sorted labels): value}."
    from prometheus_client.parser import text_string_to_metric_families
    out = {}
    for fam in text_string_to_metric_families(client.get("/metrics").text):
        for s in fam.samples:
            if s.name.startswith("mlnb_"): out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def delta(before, after, name, **labels):
    "How much the samples called `name` whose labels include `labels` grew, summed."
    keys = [k for k in after if k[0] == name and set(labels.items()) <= set(k[1])]
    return sum(after[k] - before.get(k, 0) for k in keys)


def test_metrics_count_answers_refusals_and_scores(served):
    "Issue 11: /metrics had only BentoML's request metrics."
    c = served["client"]
    before = scrape(c)
    assert c.post("/predict", json=records(10, seed=41)).status_code == 200
    assert c.post("/predict", json=records(1, seed=42)[0]).status_code == 200
    rec = records(1, seed=43)[0]
    for bad in ({**rec, "amount": -3.5}, {**rec, "channel": "fax"}, {**rec, "coupon": "X", "voucher": 1}, {**rec, "hour": "noon"}):
        assert c.post("/predict", json=bad).status_code == 422
    assert c.post("/predict", content=json.dumps(rec), headers={"content-type": "text/plain"}).status_code == 415
    after = scrape(c)
    m = dict(model="fraud-detector")
    assert delta(before, after, "mlnb_predictions_total", **m) == 11
    variants = {dict(k[1])["variant"] for k in after if k[0] == "mlnb_predictions_total"}
    assert variants <= {"champion", "challenger"} and {dict(k[1])["version"] for k in after if k[0] == "mlnb_predictions_total"} <= {"1", "2"}
    assert delta(before, after, "mlnb_refusals_total", field="amount", reason="range", **m) == 1
    assert delta(before, after, "mlnb_refusals_total", field="channel", reason="category", **m) == 1
    assert delta(before, after, "mlnb_refusals_total", field="other", reason="unknown_field", **m) == 2  # names outside the contract: one bucket
    assert delta(before, after, "mlnb_refusals_total", field="hour", reason="type", **m) == 1
    assert delta(before, after, "mlnb_refusals_total", field="request", reason="content_type", **m) == 1
    assert not [k for k in after if k[0] == "mlnb_refusals_total" and dict(k[1])["field"] in ("coupon", "voucher")]
    assert delta(before, after, "mlnb_prediction_score_count", **m) == 11
    assert 0 < delta(before, after, "mlnb_prediction_score_sum", **m) < 11
    assert delta(before, after, "mlnb_prediction_score_bucket", le="1.0", **m) == 11
    assert "bentoml_service_request_total" in c.get("/metrics").text or "bentoml_service_request_duration_seconds" in c.get("/metrics").text


def test_serve_on_a_busy_port_is_one_line_and_audits_nothing(served):
    "Issue 11: `mlnb serve` on a port in use printed 55 lines of BentoML traceback, and audited deploy.started all the same."
    from mlnb import audit
    port = int(served["url"].rsplit(":", 1)[1])  # the fixture's server holds it
    db = served["project"] / ".mlnb/audit.db"
    started = len(audit.events(db, kind="deploy.started"))
    t = time.time()
    p = run_mlnb(served["project"], "serve", served["bento"]["tag"], "--port", str(port), check=1, timeout=60)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and p.stdout == "" and time.time() - t < 30, p.stderr
    assert lines[0].startswith(f"mlnb: error: port {port} on 127.0.0.1 is in use (by pid ") and "bentoml" in lines[0], lines[0]
    assert "serve on another port with --port " in lines[0]
    assert len(audit.events(db, kind="deploy.started")) == started
    free = int(lines[0].rsplit("--port ", 1)[1])  # the port it suggests can be listened on
    with socket.socket() as s: s.bind(("127.0.0.1", free))


def test_metrics_add_up_across_workers(served, tmp_path):
    "Issue 11: the service's metrics at /metrics are the sum over every worker (prometheus_client's multiprocess files), whichever worker is asked."
    src = Path(served["bento"]["path"]) / "src" / "serving.json"
    s = json.loads(src.read_text())
    s.update(workers=2, canary_share=0, reload_interval=0)
    (tmp_path / "serving.json").write_text(json.dumps(s))
    env = {**os.environ, "MLNB_SERVING_SETTINGS": str(tmp_path / "serving.json"), "MLNB_PREDICTION_LOG": str(tmp_path / "log")}
    env.pop("MLNB_PROJECT", None)
    proc, url = another_server(served, tmp_path, env)
    try:
        rows = records(60, seed=44)
        def one(r):  # a new connection each: the kernel spreads them over both workers
            return httpx.post(url + "/predict", json=r, timeout=30).status_code
        from concurrent.futures import ThreadPoolExecutor
        with ThreadPoolExecutor(6) as pool: assert set(pool.map(one, rows)) == {200}
        time.sleep(1.5)  # the prediction log flushes every half second
        assert len(list((tmp_path / "log").glob("predictions-*.jsonl"))) == 2, "both workers answered"
        for _ in range(4):  # each scrape may land on either worker: every one shows the sum
            with httpx.Client(base_url=url, timeout=30) as fresh:
                assert delta({}, scrape(fresh), "mlnb_predictions_total", model="fraud-detector", variant="champion") == 60
    finally:
        os.killpg(proc.pid, 15)
        try: proc.wait(timeout=30)
        except subprocess.TimeoutExpired: os.killpg(proc.pid, 9)


def logged(served, rid, timeout=10):
    "The prediction log's row of request id `rid` (the log flushes every half second)."
    from mlnb.serving import read_prediction_log
    deadline = time.time() + timeout
    while time.time() < deadline:
        df = read_prediction_log(served["project"] / ".mlnb/predictions")
        if len(df) and rid in set(df["request_id"]): return df[df["request_id"] == rid]
        time.sleep(0.3)
    raise AssertionError(f"{rid} is not in the prediction log")


def test_prediction_log(served):
    r = served["client"].post("/predict", json=records(1)[0], headers={"x-request-id": "test-log-123"})
    row = logged(served, r.json()["request_id"]).iloc[0]
    assert row["model_version"] in (1, 2) and 0 <= row["score"] <= 1 and row["amount"] == records(1)[0]["amount"]
    assert row["client_request_id"] == "test-log-123"


def test_prediction_log_keeps_every_answer_when_the_server_stops(served, tmp_path):
    "Issue 12: a worker that stopped lost the lines still queued for the log's writer thread (its last half second of answers)."
    from concurrent.futures import ThreadPoolExecutor
    from mlnb.serving import read_prediction_log
    env = {**os.environ, "MLNB_PREDICTION_LOG": str(tmp_path / "log"), "MLNB_RELOAD_INTERVAL": "0", "MLNB_CANARY_SHARE": "0"}
    proc, url = another_server(served, tmp_path, env)
    try:
        with httpx.Client(base_url=url, timeout=30) as c:
            def one(r):
                resp = c.post("/predict", json=r)
                assert resp.status_code == 200, resp.text
                return resp.json()["request_id"]
            with ThreadPoolExecutor(8) as pool: ids = list(pool.map(one, records(300, seed=46)))
    finally:
        os.killpg(proc.pid, 15)  # at once: the answers of the last half second are still queued
        try: proc.wait(timeout=30)
        except subprocess.TimeoutExpired: os.killpg(proc.pid, 9)
    logged = set(read_prediction_log(tmp_path / "log")["request_id"])
    assert len(ids) == 300 and not set(ids) - logged, f"{len(set(ids) - logged)} answered requests are not in the log"


def test_request_id_is_the_servers_and_unique(served):
    "Issue 10, point 10: a client-supplied duplicate x-request-id was the log's key, and lineage returned the first match."
    c = served["client"]
    a, b = (c.post("/predict", json=rec, headers={"x-request-id": "dup-1"}) for rec in records(2, seed=31))
    ids = [a.json()["request_id"], b.json()["request_id"]]
    assert ids[0] != ids[1] and "dup-1" not in ids and all(len(i) == 32 for i in ids)
    assert [a.headers["x-request-id"], b.headers["x-request-id"]] == ids and a.json()["client_request_id"] == "dup-1"
    rows = [logged(served, i).iloc[0] for i in ids]
    assert [r["client_request_id"] for r in rows] == ["dup-1", "dup-1"] and rows[0]["amount"] != rows[1]["amount"]
    ln = [run_json(served["project"], "lineage", i)["prediction"] for i in ids]  # each id finds its own answer
    assert [p["request_id"] for p in ln] == ids and [p["score"] for p in ln] == [a.json()["score"], b.json()["score"]]
    for bad in ("x" * 129, "two words", ""):
        r = c.post("/predict", json=records(1)[0], headers={"x-request-id": bad})
        assert r.status_code == 400 and "header x-request-id" in r.json()["error"] and "1 to 128 visible ASCII" in r.json()["error"], r.text


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
    version, rid = r.json()["model_version"], r.json()["request_id"]
    deadline = time.time() + 10
    while time.time() < deadline:  # the prediction log flushes every half second
        p = run_mlnb(d, "lineage", rid, "--json")
        if p.returncode == 0: break
        time.sleep(0.5)
    ln = json.loads(p.stdout)
    assert ln["resolved_as"] == "prediction" and ln["prediction"]["request_id"] == rid and ln["prediction"]["client_request_id"] == "complaint-4711"
    assert ln["model"]["version"] == version and ln["prediction"]["score"] == r.json()["score"]
    run = ln["pipeline_run"]
    from mlnb.pipeline import load_run
    from mlnb.config import load_config
    rec = load_run(load_config(d), run["run_id"])
    assert ln["data_digest"] == rec["data_digest"] and ln["git"]["commit"] == rec["git"]["commit"] and len(ln["git"]["commit"]) == 40
    assert [s["stage"] for s in ln["stages"]] == ["ingest", "examples", "validate", "features", "train", "evaluate", "gate", "register"]
    for s in ln["stages"]:
        assert s["cache_key"] == rec["stages"][s["stage"]]["key"]
        nb = json.loads((d / s["notebook"]).read_text())  # the executed notebook, as papermill left it, at the path JupyterLab opens
        assert (d / s["notebook"]).samefile(Path(run["run_dir"]) / "notebooks" / f"{s['stage']}.ipynb") and not s["notebook"].startswith(".")
        assert nb["metadata"]["papermill"]["exception"] is None and all(c["execution_count"] for c in nb["cells"] if c["cell_type"] == "code")
        injected = [c for c in nb["cells"] if "injected-parameters" in c["metadata"].get("tags", [])]
        assert injected and all(f"{k} = " in "".join(injected[0]["source"]) for k in s["params"])
    model_version = json.loads((d / next(x for x in ln["stages"] if x["stage"] == "register")["notebook"]).read_text())
    assert f"'version': {version}" in json.dumps(model_version)  # the register notebook printed the version it registered
    assert [e["kind"] for e in ln["events"]][:3] == ["model.registered", "gate.decision", "model.alias_set" if version == 2 else "model.promoted"]
    text = run_mlnb(d, "lineage", rid, check=0).stdout
    assert text.startswith(f"prediction {rid}") and f"runs/{run['run_id']}/train.ipynb" in text and f"git commit {rec['git']['commit']}" in text
    # the id of a batch request resolves to its records
    batch = c.post("/predict/batch", json=records(3, seed=78), headers={"x-request-id": "batch-17"}).json()["request_id"]
    time.sleep(1.5)
    assert run_json(d, "lineage", batch)["prediction"]["request_id"] == f"{batch}:0"
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


REGISTRY = r'''
import os, sys, tempfile
import mlflow
from mlflow.tracking import MlflowClient
uri, name, action, *args = sys.argv[1:]
mlflow.set_tracking_uri(uri); mlflow.set_registry_uri(uri)
c = MlflowClient(uri, uri)
if action == "alias":
    c.set_registered_model_alias(name, args[0], args[1])
elif action == "tampered":  # a new version: version N's model with one byte of model.skops flipped, registered with N's tags and digest
    v = c.get_model_version(name, args[0])
    src = mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{args[0]}", dst_path=tempfile.mkdtemp(dir=args[1]))
    f = os.path.join(src, "model.skops")
    b = bytearray(open(f, "rb").read()); b[len(b) // 2] ^= 0xFF; open(f, "wb").write(b)
    print(c.create_model_version(name, source=src, run_id=v.run_id, tags=dict(v.tags)).version)
'''


def registry(served, *args):
    "Change the registry from another process, as another user would (the test process keeps no MLflow connection)."
    from mlnb.config import load_config
    cfg = load_config(served["project"])
    p = subprocess.run([sys.executable, "-c", REGISTRY, cfg.tracking_uri, cfg.model_name, *args], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout.strip()


def rss_kb(pid):
    return int(next(l for l in Path(f"/proc/{pid}/status").read_text().splitlines() if l.startswith("VmRSS:")).split()[1])


def test_the_arbiter_loads_no_model_and_audits_no_switch(served):
    "Issue 10, point 6: the `bentoml serve` arbiter loaded every model (about 400 MB) and audited every switch a second time."
    arbiter = served["proc"].pid  # `mlnb serve` execs `bentoml serve`
    workers = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and (p / "stat").exists()
               and (p / "stat").read_text().rsplit(")", 1)[1].split()[1] == str(arbiter)]
    assert workers and "_bentoml_impl.worker" in Path(f"/proc/{workers[0]}/cmdline").read_text()
    open_files = [os.readlink(f) for f in Path(f"/proc/{arbiter}/fd").iterdir() if f.exists()]
    assert not [f for f in open_files if "mlflow.db" in f or "predictions" in f], open_files
    assert not (served["project"] / f".mlnb/predictions/predictions-{arbiter}.jsonl").exists()
    arb, wrk = rss_kb(arbiter), rss_kb(workers[0])
    print(f"RSS: arbiter {arb / 1024:.0f} MB, worker {wrk / 1024:.0f} MB")
    assert arb < 200 * 1024 and arb < wrk / 2, (arb, wrk)
    from mlnb import audit
    switched = [e for e in audit.events(served["project"] / ".mlnb/audit.db", kind="deploy.switched") if e["data"].get("to") == 2]
    assert [int(e["data"]["pid"]) for e in switched] == workers, switched  # the promotion to 2, once, by the worker


def test_an_unloadable_champion_is_not_served_and_the_service_says_so(served):
    "Issue 10, point 6: when the new champion could not be loaded the service answered with the old one, retried every 2 s and logged nothing."
    c = served["client"]
    assert c.get("/metadata").json()["version"] == 2 and c.get("/readyz").status_code == 200
    bad = int(registry(served, "tampered", "2", str(served["project"])))
    registry(served, "alias", "champion", str(bad))
    def degraded():
        r = c.get("/readyz")
        return r if r.status_code == 503 else None
    r = wait_for(degraded)
    assert r.headers["content-type"] == "application/json" and "\n" not in r.text.strip()
    d = r.json()["degraded"]
    assert (r.json()["ready"], d["registry_champion"], d["serving"]) == (False, bad, 2) and "model.skops" in d["reason"], r.text
    assert c.post("/predict", json=records(1)[0]).json()["model_version"] == 2  # the last good model goes on answering
    meta = c.get("/metadata").json()
    assert meta["version"] == 2 and meta["degraded"]["registry_champion"] == bad
    assert [(p["version"], p["refused"]) for p in meta["problems"]] == [(bad, True)]
    time.sleep(8)  # retried with a growing pause (interval 1 s: after 2, 4, 8 s), still logged and audited once
    warnings = [l for l in served["log"].read_text().splitlines() if f"is version {bad}, which was refused" in l]
    assert len(warnings) == 1 and "[WARNING]" in warnings[0] and "still serving version 2" in warnings[0], warnings
    from mlnb import audit
    refused = audit.events(served["project"] / ".mlnb/audit.db", kind="model.refused")
    assert [(e["refs"]["version"], e["data"]["serving"], e["data"]["alias"]) for e in refused] == [(str(bad), 2, "champion")]
    # once the registry's champion is the served model again, the service is ready again
    registry(served, "alias", "champion", "2")
    wait_for(lambda: c.get("/readyz").status_code == 200)
    assert c.get("/metadata").json()["degraded"] is None
    # a bento of that version is refused too, with one line, and leaves no model behind in the bento store
    p = run_mlnb(served["project"], "build", str(bad), check=1)
    assert f"model 'fraud-detector' version {bad}: model.skops is not a readable skops file" in p.stderr and "Traceback" not in p.stderr, p.stderr
    stored = [f.read_text() for f in (served["project"] / ".mlnb/bentoml/models").rglob("model.yaml")]
    assert stored and not [t for t in stored if f"mlnb.version: '{bad}'" in t], stored


def test_the_bentos_model_is_the_versions_mlflow_model_as_bentoml_imports_it(served):
    """`mlnb build` copies the version's MLflow model into BentoML's model store itself (mlflow is not imported): the folder
    and model.yaml are those `bentoml.mlflow.import_model` leaves, so `bentoml.mlflow.load_model` reads the bento's model,
    and it answers as the registered version does."""
    settings = json.loads((Path(served["bento"]["path"]) / "src/serving.json").read_text())
    probe = textwrap.dedent("""\
        import json, sys
        import bentoml, pandas as pd
        from mlnb.config import load_config
        from mlnb import tracking
        cfg, tag = load_config(sys.argv[1]), sys.argv[2]
        info = bentoml.models.get(tag).info
        rows = pd.read_parquet(tracking.version_artifact_path(cfg, 1, "holdout.parquet")).head(200)
        X = rows[json.loads(sys.argv[3])]  # the contract's fields: the model's input
        print(json.dumps({"module": info.module, "framework": info.context.framework_name, "labels": info.labels,
                          "same": bool((bentoml.mlflow.load_model(tag).predict(X) == tracking.load_model(cfg, "1").predict(X)).all())}))
        """)
    p = subprocess.run([sys.executable, "-c", probe, str(served["project"]), settings["bento_model"], json.dumps(list(settings["fields"]))],
                       capture_output=True, text=True, timeout=300, env={**os.environ, "BENTOML_HOME": str(served["project"] / ".mlnb/bentoml")})
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout.splitlines()[-1]) == {"module": "bentoml.mlflow", "framework": "mlflow", "labels": {"mlnb.version": "1"}, "same": True}


def test_a_replaced_tracking_store_is_followed(served):
    "Issue 10, point 6: after mlflow.db was replaced (restored from a backup) the service read the deleted file and never saw a promotion again."
    c = served["client"]
    db = served["project"] / ".mlnb/mlflow.db"
    shutil.copy(db, db.with_name("mlflow.db.restored"))
    os.replace(db.with_name("mlflow.db.restored"), db)  # a new file (a new inode) under the old name
    registry(served, "alias", "champion", "1")
    wait_for(lambda: c.get("/metadata").json()["version"] == 1, timeout=20)
    assert c.post("/predict", json=records(1)[0]).json()["model_version"] in (1, 2)  # 2 may still be the canary's challenger
    registry(served, "alias", "champion", "2")
    wait_for(lambda: c.get("/metadata").json()["version"] == 2, timeout=20)
    assert c.get("/readyz").status_code == 200


def test_a_bento_whose_model_is_not_the_registered_one_is_not_served(served, tmp_path):
    "Issue 10, point 2: a swapped model file was served while /metadata showed the registered digest. Now the server ends, with one line."
    src = Path(served["bento"]["path"]) / "src" / "serving.json"
    s = json.loads(src.read_text())
    s["version"] = 2  # the registry's digest of version 2 against the bento's model file, which is version 1's
    (tmp_path / "serving.json").write_text(json.dumps(s))
    env = {**os.environ, "MLNB_SERVING_SETTINGS": str(tmp_path / "serving.json")}
    env.pop("MLNB_PROJECT", None)
    p = subprocess.Popen([*MLNB, "--project", str(served["project"]), "serve", served["bento"]["tag"], "--port", str(free_port())],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try: out = p.communicate(timeout=120)[0]
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, 9)  # the server and its workers
        raise AssertionError("the server went on (restarting its worker) instead of ending") from None
    lines = [l for l in out.splitlines() if "mlnb: not serving" in l]
    assert len(lines) == 1 and "[ERROR]" in lines[0] and "model.skops has digest" in lines[0] and "was registered" in lines[0], out
    assert "Traceback" not in out


def test_fuzz_1000_bad_requests_never_5xx(served):
    "Issue 10, point 5: generated hostile requests (bench/fuzz.py) against the served bento: 4xx only, and a valid request is answered after."
    import importlib.util
    spec = importlib.util.spec_from_file_location("fuzz", ROOT / "bench" / "fuzz.py")
    fuzz = importlib.util.module_from_spec(spec); spec.loader.exec_module(fuzz)
    res = fuzz.run(served["url"], n=1200, seed=10)
    print(json.dumps({k: res[k] for k in ("requests", "statuses", "not_4xx", "largest_answer_bytes", "slowest_s", "seconds")}))
    assert res["requests"] >= 1000 and res["server_errors"] == 0, res
    assert set(res["not_4xx"]) <= {"mutation -> 200"}, res["not_4xx"]  # only a random mutation may happen to stay valid
    assert res["largest_answer_bytes"] <= 2100 and res["valid_after"] == 200


# --- serving from the feature store: account-level features looked up by account_id ---

from mlnb.data import ACCOUNT_FEATURES  # n_tx_24h, account_age_days, usual_amount: the reference looks them up by account_id


def start_server(project, tag, log, env=None):
    "`mlnb serve` of bento `tag` on a free port, once it is ready: (process, url)."
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([*MLNB, "--project", str(project), "serve", tag, "--port", str(port)], env=env or dict(os.environ),
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if httpx.get(url + "/readyz", timeout=1).status_code == 200: return proc, url
        except httpx.HTTPError: pass
        if proc.poll() is not None: raise AssertionError(log.read_text())
        time.sleep(0.5)
    os.killpg(proc.pid, 9)
    raise AssertionError(f"the server did not answer within 120 s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def feature_served(tmp_path_factory, reference_run):
    """The reference project, whose account features come from its feature store (register materialized them), its bento
    served; six records of its transactions, each with the account features the online store has for its account."""
    import pandas as pd
    from mlnb.data import generate_accounts
    d = reference_project_reusing(tmp_path_factory.mktemp("feature-serving"), reference_run)
    run_json(d, "run", "--jobs", "2", timeout=600)  # register runs again (its version is not in this registry) and materializes
    built = run_json(d, "build", timeout=300)
    proc, url = start_server(d, built["tag"], d / "serve.log")
    tx, snapshots = generate_accounts(20000, seed=42)  # the reference's data (ingest's defaults)
    rows = tx.sample(6, random_state=1)
    newest = snapshots.groupby("account_id").last()  # sorted by time: each account's newest snapshot, what the online store holds
    recs = json.loads(rows.join(newest[ACCOUNT_FEATURES], on="account_id")[FEATURES].to_json(orient="records"))
    yield {"url": url, "project": d, "bento": built, "client": httpx.Client(base_url=url, timeout=30),
           "records": recs, "accounts": [int(a) for a in rows.account_id]}
    os.killpg(proc.pid, 15)
    try: proc.wait(timeout=30)
    except subprocess.TimeoutExpired: os.killpg(proc.pid, 9)


def short(rec, account):
    "The record as a caller of a feature-store service sends it: the account id and the request's own fields."
    return {"account_id": account, **{k: v for k, v in rec.items() if k not in ACCOUNT_FEATURES}}


def test_feature_store_request_with_only_the_key_answers_as_every_feature(feature_served):
    c, recs, accounts = feature_served["client"], feature_served["records"], feature_served["accounts"]
    answer = lambda body: {k: v for k, v in body.items() if k not in ("request_id",)}
    for rec, acc in zip(recs[:2], accounts):  # one record: the same answer as with every feature spelled out
        full, looked_up = c.post("/predict", json=rec), c.post("/predict", json=short(rec, acc))
        assert full.status_code == 200 and looked_up.status_code == 200, (full.text, looked_up.text)
        assert answer(looked_up.json()) == answer(full.json())
    # a batch, one lookup for all: short records, a record with every feature (and its key), in one request
    batch = [short(r, a) for r, a in zip(recs, accounts)]
    batch[3] = {**recs[3], "account_id": accounts[3]}
    full, looked_up = c.post("/predict", json=recs), c.post("/predict", json=batch)
    assert full.status_code == 200 and looked_up.status_code == 200, (full.text, looked_up.text)
    assert looked_up.json()["predictions"] == full.json()["predictions"]
    # what a record carries itself wins over the store
    rec = {**short(recs[0], accounts[0]), **{f: recs[1][f] for f in ACCOUNT_FEATURES[:2]}}  # usual_amount from the store
    assert c.post("/predict", json=rec).json()["score"] == c.post("/predict", json={**recs[0], **{f: recs[1][f] for f in ACCOUNT_FEATURES[:2]}}).json()["score"]


def test_feature_store_unknown_entity_is_a_422_naming_it(feature_served):
    c, recs, accounts = feature_served["client"], feature_served["records"], feature_served["accounts"]
    r = c.post("/predict", json=short(recs[0], 99999))
    assert r.status_code == 422 and "the online store has no features for account_id=99999" in r.json()["error"], r.text
    r = c.post("/predict", json=[short(recs[0], accounts[0]), short(recs[1], 99998)])
    assert r.status_code == 422 and "record 1: account_id=99998" in r.json()["error"], r.text
    r = c.post("/predict", json={k: v for k, v in short(recs[0], 1).items() if k != "account_id"})
    assert r.status_code == 422 and "field 'account_id' is missing: it is the entity key" in r.json()["error"], r.text
    r = c.post("/predict", json=short(recs[0], "101"))
    assert r.status_code == 422 and "field 'account_id' = \"101\" is not accepted; expected an integer" in r.json()["error"], r.text
    r = c.post("/predict", json={**short(recs[0], accounts[0]), "hour": "noon"})  # the assembled record is checked against the contract as before
    assert r.status_code == 422 and "field 'hour' = \"noon\" is not accepted" in r.json()["error"], r.text
    assert c.post("/predict", json=recs[0]).status_code == 200  # the service goes on


def test_monitor_reports_the_stores_freshness_and_alerts_when_it_is_too_old(feature_served, tmp_path):
    """With feature_max_age set, `mlnb monitor` reports each view's materialization age with its verdict and alerts (exit 3,
    as on drift) when the online store's newest values are older than that; a generous limit does not alert on its own."""
    d = feature_served["project"]
    data = tmp_path / "traffic.parquet"
    generate_transactions(400, seed=31)[FEATURES].to_parquet(data)
    ok = run_mlnb(d, "monitor", "--data", str(data), "--json", env={"MLNB_FEATURE_MAX_AGE": "3e10"}, check=None)
    res = json.loads(ok.stdout)
    [view] = res["features"]
    assert view["view"] == "account_features" and view["materialized_until"] and view["stale"] is False, view
    assert ok.returncode == (3 if res["alert"] else 0), ok.stderr
    stale = run_mlnb(d, "monitor", "--data", str(data), env={"MLNB_FEATURE_MAX_AGE": "60"}, check=3)
    assert "feature view account_features: materialized until " in stale.stdout and "STALE: older than feature_max_age = 60 s" in stale.stdout, stale.stdout


def test_feature_store_metadata_and_lineage_name_the_views(feature_served):
    d, tag = feature_served["project"], feature_served["bento"]["tag"]
    meta = feature_served["client"].get("/metadata").json()
    digest = json.loads((d / ".mlnb/features/applied.json").read_text())["digest"]
    f = meta["features"]
    assert [(v["name"], v["features"], v["join_keys"]) for v in f["views"]] == [("account_features", ACCOUNT_FEATURES, ["account_id"])]
    assert f["digest"] == digest and f["entity_keys"] == ["account_id"] and f["unknown_entity"] == "refuse"
    assert "n_tx_24h" not in f["request_fields"] and "amount" in f["request_fields"]
    assert meta["feature_views"] == ["account_features"] and meta["feature_digest"] == digest
    assert (Path(feature_served["bento"]["path"]) / "src" / "feature_registry.db").is_file()  # the definitions served travel with the bento
    ln = run_json(d, "lineage", tag)
    assert ln["bento"]["feature_views"] == ["account_features"] and ln["bento"]["feature_digest"] == digest
    assert "features from account_features" in run_mlnb(d, "lineage", tag).stdout
    # the OpenAPI document says what a caller may leave out: the store's features (then the key), nothing else
    body = feature_served["client"].get("/openapi.json").json()["paths"]["/predict"]["post"]["requestBody"]["content"]["application/json"]
    record = body["schema"]["oneOf"][0]
    assert set(record["required"]) == set(f["request_fields"]) and not set(ACCOUNT_FEATURES) & set(record["required"]), record["required"]
    assert record["properties"]["account_id"]["type"] == "integer" and "account_id" not in record["required"]
    assert "looked up in the feature store (view `account_features`, by account_id)" in record["properties"]["n_tx_24h"]["description"]
    assert "may be left out if the record gives account_id" in feature_served["client"].get("/openapi.json").json()["paths"]["/predict"]["post"]["description"]
