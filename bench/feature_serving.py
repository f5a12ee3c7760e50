"""Serving from the feature store (issue 14): the reference model's bento with account features (`n_tx_24h`,
`account_age_days`) defined in Feast and looked up by `account_id` in the online store, at concurrency 16.

Two kinds of single-record requests to the same server, alternating: one that carries every feature itself (the baseline:
no lookup) and one that carries the account id and the request's own fields (the service looks up the account's features
in the SQLite online store, then checks and scores as before). Throughput from wrk, p50/p99 from hey, as bench/serving.py.

Usage: .venv/bin/python bench/feature_serving.py [--seconds 5] [--rounds 2] [--out bench/RESULTS-feature-serving.md]
"""
import argparse, json, os, shutil, signal, statistics, subprocess, sys, tempfile, time
from pathlib import Path
import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from serving import MLNB, free_port, load, stop  # noqa: E402  (the same load generator and measures)

ACCOUNT = ["n_tx_24h", "account_age_days"]
DEFINITIONS = [
    "from datetime import timedelta\nfrom feast import Entity, FeatureView, Field, FileSource, ValueType\nfrom feast.types import Int64",
    'account = Entity(name="account", join_keys=["account_id"], value_type=ValueType.INT64)',
    'account_stats = FeatureView(name="account_stats", entities=[account], ttl=timedelta(days=3650),\n'
    '    schema=[Field(name="n_tx_24h", dtype=Int64), Field(name="account_age_days", dtype=Int64)],\n'
    '    source=FileSource(path="data/account_stats.parquet", timestamp_field="ts"))']


def mlnb(d, *args, timeout=900):
    p = subprocess.run([*MLNB, "--project", str(d), *args], capture_output=True, text=True, timeout=timeout)
    if p.returncode: raise SystemExit(f"mlnb {' '.join(args)} failed:\n{p.stderr[-3000:]}")
    return p.stdout


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "RESULTS-feature-serving.md")
    a = ap.parse_args()
    for tool in ("wrk", "hey"):
        if not shutil.which(tool): raise SystemExit(f"{tool} is not installed: apt-get install wrk hey")
    import pandas as pd
    work = Path(tempfile.mkdtemp(prefix="mlnb-bench-fserve-"))
    d = work / "project"; d.mkdir()
    ini = (ROOT / "settings.ini").read_text().replace("policy_champion_clean_git = true", "policy_champion_clean_git = false")
    (d / "settings.ini").write_text(ini)  # a scratch copy outside git
    shutil.copytree(ROOT / "nbs/pipeline", d / "nbs/pipeline")
    print("running the reference pipeline ...", file=sys.stderr)
    rec = json.loads(mlnb(d, "run", "--json", "--jobs", "2"))
    train = pd.read_parquet(Path(rec["stages"]["features"]["entry"]) / "train.parquet")
    from mlnb.data import FEATURES
    rows = train[FEATURES].head(10_000).reset_index(drop=True)
    (d / "data").mkdir()
    pd.DataFrame({"account_id": range(len(rows)), "ts": pd.Timestamp("2026-01-01", tz="UTC"),
                  **{f: rows[f].astype("int64") for f in ACCOUNT}}).to_parquet(d / "data/account_stats.parquet")
    nb = {"cells": [{"cell_type": "code", "execution_count": None, "id": f"c{i}", "metadata": {}, "outputs": [], "source": s}
                    for i, s in enumerate(DEFINITIONS)], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}
    (d / "nbs/features.ipynb").write_text(json.dumps(nb))
    mlnb(d, "features", "materialize", "--end", "2026-02-01")
    tag = json.loads(mlnb(d, "build", "--json"))["tag"]
    port = free_port()
    url = f"http://127.0.0.1:{port}/predict"
    env = {**os.environ, "MLNB_RELOAD_INTERVAL": "0"}
    proc = subprocess.Popen([*MLNB, "--project", str(d), "serve", tag, "--port", str(port)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 180
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200: break
            except httpx.HTTPError: pass
            if proc.poll() is not None or time.time() > deadline: raise SystemExit("the bento did not start")
            time.sleep(0.5)
        full = {k: (v.item() if hasattr(v, "item") else v) for k, v in rows.iloc[7].to_dict().items()}
        key_only = {"account_id": 7, **{k: v for k, v in full.items() if k not in ACCOUNT}}
        a1, a2 = httpx.post(url, json=full).json(), httpx.post(url, json=key_only).json()
        assert a1["score"] == a2["score"], (a1, a2)  # the same answer either way
        bodies = {"every feature in the request (baseline)": json.dumps(full), "account_id only: looked up online": json.dumps(key_only)}
        runs = {k: [] for k in bodies}
        for i in range(a.rounds):  # alternate: the machine's load drifts
            for name, body in bodies.items():
                runs[name].append(r := load(url, body, 16, a.seconds, work))
                print(f"round {i + 1}: {name}: {r}", file=sys.stderr)
    finally:
        stop(proc)
    med = {k: {m: statistics.median(r[m] for r in v) for m in ("rps", "p50", "p99")} | {"non2xx": sum(r["non2xx"] for r in v)} for k, v in runs.items()}
    base = med["every feature in the request (baseline)"]
    lines = [f"# Serving from the feature store ({time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores, c=16, {a.seconds} s per point, "
             f"median of {a.rounds} alternating rounds; wrk throughput, hey latency)", "",
             "The reference model's bento with `n_tx_24h` and `account_age_days` in a Feast feature view keyed by `account_id` "
             f"({len(rows):,} accounts materialized into the SQLite online store); the same server for both kinds of request.", "",
             "| request | req/s | × baseline | p50 ms | p99 ms | non-2xx |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for name, r in med.items():
        lines.append(f"| {name} | {r['rps']:.0f} | {r['rps'] / base['rps']:.2f} | {r['p50']:.1f} | {r['p99']:.1f} | {r['non2xx']} |")
    text = "\n".join(lines) + "\n"
    print(text)
    a.out.write_text(text)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
