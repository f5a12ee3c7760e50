"""Serving benchmark (issue: candidate to served champion). Prints ratios against baselines measured in the same run.

For a LogisticRegression and for the reference HistGradientBoosting model, single-record POSTs at concurrency
1, 16 and 64 against: the mlnb bento (`bentoml serve`), the same bento with the prediction log off,
`mlflow models serve --env-manager local` of the same model version, and a thin FastAPI + uvicorn app that
calls predict_proba (the baseline). Throughput from wrk; p50/p99 from hey (wrk's percentiles are wrong at low
concurrency, wg/wrk#438). Needs wrk and hey (Debian packages: apt-get install wrk hey). rows/batch is the mean batch the
service scored during a point (from its /metadata). The results file's part under "## Notes" is hand-written and kept.

Usage: .venv/bin/python bench/serving.py [--seconds 5] [--out bench/RESULTS-serving.md]
"""
import argparse, json, os, re, shutil, signal, socket, subprocess, sys, tempfile, time
from dataclasses import replace
from pathlib import Path
import httpx

ROOT = Path(__file__).resolve().parents[1]
for k in ("MLFLOW_DISABLE_TELEMETRY", "BENTOML_DO_NOT_TRACK", "DO_NOT_TRACK"): os.environ[k] = "true"
BIN = Path(sys.executable).parent
MLNB = [sys.executable, "-c", "from mlnb.cli import main; main()"]


NOTES = "## Notes"  # the results file's hand-written part, after the tables


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); return s.getsockname()[1]


def start(cmd, env, url, cwd=None):
    p = subprocess.Popen(cmd, env={**os.environ, **env}, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.time() + 180
    while time.time() < deadline:
        try:
            if httpx.post(url, content=BODY, headers={"content-type": "application/json"}, timeout=2).status_code < 500: return p
        except httpx.HTTPError: pass
        if p.poll() is not None: raise SystemExit(f"{cmd[:3]} exited: {p.stderr.read().decode()[-2000:]}")
        time.sleep(0.5)
    raise SystemExit(f"{cmd[:3]} did not start")


def stop(p):
    try: os.killpg(p.pid, signal.SIGTERM); p.wait(timeout=30)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try: os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError: pass


def batching(url):
    "(batches, rows) the service has scored so far, from its /metadata; None for a server that does not say."
    try: b = httpx.get(url.rsplit("/", 1)[0] + "/metadata", timeout=5).json()["batching"]
    except (httpx.HTTPError, ValueError, KeyError, TypeError): return None
    return b["batches"], b["rows"]


def load(url, body, conc, seconds, work):
    before = batching(url)
    lua = work / "post.lua"
    lua.write_text(f'wrk.method = "POST"\nwrk.body = {json.dumps(body)}\nwrk.headers["Content-Type"] = "application/json"\n')
    (work / "body.json").write_text(body)
    w = subprocess.run(["wrk", "-t", str(min(2, conc)), "-c", str(conc), "-d", f"{seconds}s", "-s", str(lua), url], capture_output=True, text=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", w).group(1))
    bad = int(m.group(1)) if (m := re.search(r"Non-2xx or 3xx responses: (\d+)", w)) else 0
    errs = sum(int(x) for x in re.findall(r"(?:connect|read|write|timeout) (\d+)", w.split("Socket errors:")[1])) if "Socket errors:" in w else 0
    h = subprocess.run(["hey", "-z", f"{seconds}s", "-c", str(conc), "-m", "POST", "-T", "application/json", "-D", str(work / "body.json"), url],
                       capture_output=True, text=True).stdout
    pct = {int(a): float(b) * 1000 for a, b in re.findall(r"\s+(\d+)%% in ([\d.]+) secs".replace("%%", "%"), h)}
    codes = dict(re.findall(r"\[(\d+)\]\s+(\d+) responses", h))
    bad += sum(int(n) for c, n in codes.items() if not c.startswith("2"))
    after = batching(url)
    per_batch = (after[1] - before[1]) / max(1, after[0] - before[0]) if before and after else None
    return {"rps": rps, "p50": pct.get(50), "p99": pct.get(99), "non2xx": bad + errs, "rows_per_batch": per_batch}


def main():
    global BODY
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--concurrency", default="1,16,64")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "RESULTS-serving.md")
    a = ap.parse_args()
    for tool in ("wrk", "hey"):
        if not shutil.which(tool): raise SystemExit(f"{tool} is not installed: apt-get install wrk hey")
    work = Path(tempfile.mkdtemp(prefix="mlnb-bench-serve-"))
    d = work / "project"; d.mkdir()
    shutil.copy(ROOT / "settings.ini", d / "settings.ini")
    ini = d / "settings.ini"  # a scratch copy outside git: the policy's clean-git rule would leave the reference model a challenger
    ini.write_text(ini.read_text().replace("policy_champion_clean_git = true", "policy_champion_clean_git = false"))
    shutil.copytree(ROOT / "nbs/pipeline", d / "nbs/pipeline")
    print("running the reference pipeline ...", file=sys.stderr)
    rec = json.loads(subprocess.run([*MLNB, "--project", str(d), "run", "--json", "--jobs", "2"], capture_output=True, text=True, check=True).stdout)
    os.environ["MLNB_PROJECT"] = str(d)
    from mlnb.config import load_config
    from mlnb import tracking, serving
    from mlnb.data import FEATURES, CATEGORICAL, TARGET
    import pandas as pd
    from sklearn.compose import make_column_transformer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import OneHotEncoder, StandardScaler
    cfg = load_config(d)
    train = pd.read_parquet(Path(rec["stages"]["features"]["entry"]) / "train.parquet")
    num = [c for c in FEATURES if c not in CATEGORICAL]
    lr = make_pipeline(make_column_transformer((OneHotEncoder(handle_unknown="ignore"), CATEGORICAL), (StandardScaler(), num)),
                       LogisticRegression(max_iter=1000, class_weight="balanced")).fit(train[FEATURES], train[TARGET])
    contract = tracking.version_artifact(cfg, 1, "contract.yaml")
    lr_cfg = replace(cfg, model_name="fraud-detector-lr")
    v = tracking.register_model(lr, train[FEATURES], name=lr_cfg.model_name, artifacts={"contract.yaml": contract}, cfg=lr_cfg, interactive=True)
    tracking.set_alias(lr_cfg, "champion", v["version"], "benchmark baseline", kind="promote")
    BODY = json.dumps(train[FEATURES].iloc[0].to_dict())
    concs = [int(c) for c in a.concurrency.split(",")]
    results = {}
    for label, mcfg in (("LogisticRegression", lr_cfg), ("HistGradientBoosting (reference)", cfg)):
        built = serving.build_bento(mcfg, "champion")
        uri = f"models:/{mcfg.model_name}/{built['version']}"
        servers = {
            "thin FastAPI + uvicorn (baseline)": ([str(BIN / "uvicorn"), "thin_app:app", "--port", "{port}", "--no-access-log", "--log-level", "warning"],
                                                  {"MODEL_URI": uri, "MLFLOW_TRACKING_URI": cfg.tracking_uri, "PYTHONPATH": str(ROOT / "bench")}, "/predict", ROOT / "bench"),
            "mlnb bento (bentoml serve)": (serving.serve_command(mcfg, built["tag"], port=0)[0], {"BENTOML_HOME": str(serving.bento_home(cfg)), "MLNB_RELOAD_INTERVAL": "0"}, "/predict", None),
            "mlnb bento, prediction log off": (serving.serve_command(mcfg, built["tag"], port=0)[0], {"BENTOML_HOME": str(serving.bento_home(cfg)), "MLNB_RELOAD_INTERVAL": "0", "MLNB_PREDICTION_LOG": ""}, "/predict", None),
            "mlflow models serve --env-manager local": ([str(BIN / "mlflow"), "models", "serve", "-m", uri, "-p", "{port}", "--env-manager", "local"],
                                                        {"MLFLOW_TRACKING_URI": cfg.tracking_uri, "OMP_NUM_THREADS": "1", "PATH": f"{BIN}:{os.environ['PATH']}"}, "/invocations", None),
        }
        for name, (cmd, env, path, cwd) in servers.items():
            port = free_port()
            cmd = [c.replace("{port}", str(port)) for c in cmd]
            if "--port" in cmd: cmd[cmd.index("--port") + 1] = str(port)
            body = BODY if path == "/predict" else json.dumps({"dataframe_records": [json.loads(BODY)]})
            BODY_SAVED, BODY = BODY, body
            print(f"{label}: {name} ...", file=sys.stderr)
            p = start(cmd, env, f"http://127.0.0.1:{port}{path}", cwd=cwd)
            try:
                for c in concs:
                    results[(label, name, c)] = r = load(f"http://127.0.0.1:{port}{path}", body, c, a.seconds, work)
                    print(f"  c={c}: {r}", file=sys.stderr)
            finally:
                stop(p); BODY = BODY_SAVED
    lines = [f"# Serving benchmarks ({time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores, {a.seconds} s per point; wrk throughput, hey latency)", ""]
    for label in ("LogisticRegression", "HistGradientBoosting (reference)"):
        lines += [f"## {label}", "", "| server | c | req/s | × thin | p50 ms | p99 ms | non-2xx | rows/batch |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for (lab, name, c), r in results.items():
            if lab != label: continue
            base = results[(label, "thin FastAPI + uvicorn (baseline)", c)]["rps"]
            per_batch = f"{r['rows_per_batch']:.1f}" if r.get("rows_per_batch") else ""
            lines.append(f"| {name} | {c} | {r['rps']:.0f} | {r['rps'] / base:.2f} | {r['p50'] or 0:.1f} | {r['p99'] or 0:.1f} | {r['non2xx']} | {per_batch} |")
        on = {c: results[(label, "mlnb bento (bentoml serve)", c)]["rps"] for c in concs}
        off = {c: results[(label, "mlnb bento, prediction log off", c)]["rps"] for c in concs}
        lines += ["", "prediction log cost (throughput with log / without): " + ", ".join(f"c={c}: {on[c] / off[c]:.2f}" for c in concs), ""]
    lines += ["Targets at c=16, both models: at least 0.7 × the thin baseline's throughput, p99 at most 25 ms, no non-2xx; "
              "prediction logging costs at most 10% of throughput."]
    lines.append("")
    for label in ("LogisticRegression", "HistGradientBoosting (reference)"):
        if 16 in concs:
            r, thin = results[(label, "mlnb bento (bentoml serve)", 16)], results[(label, "thin FastAPI + uvicorn (baseline)", 16)]
            lines.append(f"- {label} at c=16: p99 {r['p99'] or 0:.1f} ms ({'within' if (r['p99'] or 1e9) <= 25 else 'over'} 25 ms), "
                         f"{r['rps']:.0f} req/s = {r['rps'] / thin['rps']:.2f} × thin, {r['non2xx']} non-2xx")
    text = "\n".join(lines) + "\n"
    print(text)
    notes = a.out.read_text().partition(NOTES)[2] if a.out.exists() else ""
    a.out.write_text(text + (f"\n{NOTES}{notes}" if notes else ""))  # the notes below the tables are written by hand: kept
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
