"""Serving from the feature store (issue 14): the reference model's bento, whose account features (`n_tx_24h`,
`account_age_days`, `usual_amount`) are defined in Feast and looked up by `account_id` in the online store, at concurrency 16.

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
    print("running the reference pipeline (its register stage loads the online store) ...", file=sys.stderr)
    mlnb(d, "run", "--json", "--jobs", "2")
    from mlnb.data import ACCOUNT_FEATURES, FEATURES, N_ACCOUNTS, generate_accounts
    tx, snapshots = generate_accounts(20000, seed=42)  # the reference's data (ingest's defaults)
    newest = snapshots.groupby("account_id").last()  # what the online store holds for each account
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
        full = json.loads(tx.iloc[[7]].join(newest[ACCOUNT_FEATURES], on="account_id")[FEATURES].to_json(orient="records"))[0]
        key_only = {"account_id": int(tx.account_id.iloc[7]), **{k: v for k, v in full.items() if k not in ACCOUNT_FEATURES}}
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
             "The reference model's bento: `n_tx_24h`, `account_age_days` and `usual_amount` in its Feast feature view keyed by `account_id` "
             f"({N_ACCOUNTS:,} accounts materialized into the SQLite online store by the pipeline); the same server for both kinds of request.", "",
             "| request | req/s | × baseline | p50 ms | p99 ms | non-2xx |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for name, r in med.items():
        lines.append(f"| {name} | {r['rps']:.0f} | {r['rps'] / base['rps']:.2f} | {r['p50']:.1f} | {r['p99']:.1f} | {r['non2xx']} |")
    text = "\n".join(lines) + "\n"
    print(text)
    a.out.write_text(text)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
