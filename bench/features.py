"""Feature store benchmarks (issue 14). Prints ratios against baselines measured in the same run.

  (a) materialization: `mlnb.features.materialize` (Feast's file offline store into its SQLite online store) of N rows
      of account statistics, against the floor of the same work by hand (the baseline): pandas reads the parquet file,
      keeps each account's newest row, and sqlite3 writes them into one table with a primary key.
  (b) online lookups: one entity at a time through `mlnb.features.online_features` (what `mlnb features get` does) and
      1,000 entities in one `get_online_features` call (what a batch of requests costs), against a primary-key SELECT in
      the hand-made table.
  (c) importing Feast, in a fresh process that already has mlnb and pandas (CPU seconds of the import alone): Feast as it
      imports itself (the baseline: typeguard instruments each of its classes, compiling the class's module once per
      method), against mlnb's import for a process that only reads the store (a service's worker, `mlnb monitor`, a
      stage's lookups) and for one that runs the definitions above (the checks of the classes they name instrumented then).

Each measurement is repeated (`--repeat`, fresh stores each time for (a)); medians. Usage:
  .venv/bin/python bench/features.py [--rows 200000] [--repeat 3] [--out bench/RESULTS-features.md]
"""
import argparse, json, os, random, sqlite3, statistics, sys, tempfile, time
from pathlib import Path

for k in ("MLFLOW_DISABLE_TELEMETRY", "BENTOML_DO_NOT_TRACK", "DO_NOT_TRACK"): os.environ[k] = "true"
ROOT = Path(__file__).resolve().parents[1]
DEFINITIONS = [
    "from datetime import timedelta\nfrom feast import Entity, FeatureView, Field, FileSource, ValueType\nfrom feast.types import Float64, Int64",
    'account = Entity(name="account", join_keys=["account_id"], value_type=ValueType.INT64)',
    'account_stats = FeatureView(name="account_stats", entities=[account], ttl=timedelta(days=3650),\n'
    '    schema=[Field(name="n_tx_24h", dtype=Int64), Field(name="usual_amount", dtype=Float64), Field(name="account_age_days", dtype=Int64)],\n'
    '    source=FileSource(path="data/account_stats.parquet", timestamp_field="ts"))',
]


def make_project(rows: int, accounts: int) -> Path:
    "A project folder with `rows` account statistics (`accounts` accounts, several rows each) and the definitions notebook."
    import numpy as np, pandas as pd
    d = Path(tempfile.mkdtemp(prefix="mlnb-bench-features-"))
    (d / "settings.ini").write_text("[mlnb]\ntarget = y\n")
    (d / "data").mkdir(); (d / "nbs").mkdir()
    rng = np.random.default_rng(0)
    pd.DataFrame({"account_id": rng.integers(0, accounts, rows),
                  "ts": pd.Timestamp("2026-01-01", tz="UTC") + pd.to_timedelta(rng.integers(0, 86400 * 30, rows), unit="s"),
                  "n_tx_24h": rng.integers(0, 50, rows), "usual_amount": rng.gamma(2.0, 40.0, rows).round(2),
                  "account_age_days": rng.integers(0, 3000, rows)}).to_parquet(d / "data/account_stats.parquet")
    nb = {"cells": [{"cell_type": "code", "execution_count": None, "id": f"c{i}", "metadata": {}, "outputs": [], "source": s}
                    for i, s in enumerate(DEFINITIONS)], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}
    (d / "nbs/features.ipynb").write_text(json.dumps(nb))
    return d


def by_hand(project: Path, db: Path) -> float:
    "The baseline: read the parquet file, keep each account's newest row, write them to SQLite with a primary key; seconds."
    import pandas as pd
    t0 = time.perf_counter()
    df = pd.read_parquet(project / "data/account_stats.parquet")
    newest = df.sort_values("ts").drop_duplicates("account_id", keep="last")
    con = sqlite3.connect(db)
    con.execute("CREATE TABLE account_stats (account_id INTEGER PRIMARY KEY, ts TEXT, n_tx_24h INTEGER, usual_amount REAL, account_age_days INTEGER)")
    con.executemany("INSERT OR REPLACE INTO account_stats VALUES (?, ?, ?, ?, ?)",
                    zip(newest.account_id.tolist(), newest.ts.astype(str).tolist(), newest.n_tx_24h.tolist(),
                        newest.usual_amount.tolist(), newest.account_age_days.tolist()))
    con.commit(); con.close()
    return time.perf_counter() - t0


IMPORT = """
import json, sys, time
import pandas, mlnb.features as features
t = time.process_time()
if sys.argv[1] == "feast": import feast
else: features._feast(features._names(json.loads(sys.argv[2])) if sys.argv[1] == "checked" else frozenset())
print(time.process_time() - t)
"""


def import_cpu(how: str) -> float:
    "CPU seconds a fresh process spends importing Feast: `feast` (import feast), `mlnb` (a reader's) or `checked` (checks instrumented)."
    import subprocess
    p = subprocess.run([sys.executable, "-W", "ignore", "-c", IMPORT, how, json.dumps(DEFINITIONS)], capture_output=True, text=True, check=True)
    return float(p.stdout.split()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--accounts", type=int, default=20_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "bench/RESULTS-features.md"))
    a = ap.parse_args()
    from mlnb.config import load_config
    from mlnb import features
    project = make_project(a.rows, a.accounts)
    feast_s, hand_s = [], []
    for i in range(a.repeat):  # alternate the two (the machine's load drifts); a fresh store each time
        cfg = load_config(project, env={"MLNB_FEATURE_STORE": f".mlnb/features-{i}"})
        features.apply_definitions(cfg)
        t0 = time.perf_counter(); features.materialize(cfg, end="2026-02-01"); feast_s.append(time.perf_counter() - t0)
        hand_s.append(by_hand(project, project / f"hand-{i}.db"))
        print(f"round {i + 1}: materialize {feast_s[-1]:.2f} s, by hand {hand_s[-1]:.2f} s", file=sys.stderr)
    mat, hand = statistics.median(feast_s), statistics.median(hand_s)
    # online lookups, against the last round's stores
    keys = random.Random(0).sample(range(a.accounts), 1000)
    store = features.open_store(cfg)
    refs = ["account_stats:n_tx_24h", "account_stats:usual_amount", "account_stats:account_age_days"]
    features.online_features(cfg, {"account_id": keys[0]})  # first call: registry read, connections
    # `online_features` opens the project's store on each call (as each `mlnb features get` does); a service keeps one open
    t0 = time.perf_counter()
    for k in keys[:200]: features.online_features(cfg, {"account_id": k})
    one = (time.perf_counter() - t0) / 200
    t0 = time.perf_counter()
    for k in keys[:200]: store.get_online_features(features=refs, entity_rows=[{"account_id": k}]).to_dict()
    one_store = (time.perf_counter() - t0) / 200
    batch = statistics.median([(lambda t: (store.get_online_features(features=refs, entity_rows=[{"account_id": k} for k in keys]).to_dict(),
                                           time.perf_counter() - t)[1])(time.perf_counter()) for _ in range(a.repeat)])
    cpu = {h: [] for h in ("feast", "mlnb", "checked")}
    for _ in range(a.repeat):  # alternated, fresh processes
        for h in cpu: cpu[h].append(import_cpu(h))
    cpu = {h: statistics.median(v) for h, v in cpu.items()}
    con = sqlite3.connect(project / f"hand-{a.repeat - 1}.db")
    t0 = time.perf_counter()
    for k in keys: con.execute("SELECT * FROM account_stats WHERE account_id = ?", (k,)).fetchone()
    sel = (time.perf_counter() - t0) / len(keys)
    lines = [f"# Feature store benchmarks ({time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores, {a.rows:,} rows of {a.accounts:,} accounts, "
             f"median of {a.repeat})", "",
             "## (a) Materialization into the online store", "",
             "| what | s | rows/s | × baseline |", "| --- | ---: | ---: | ---: |",
             f"| by hand: pandas reads, keeps each account's newest row, sqlite3 writes it (baseline) | {hand:.2f} | {a.rows / hand:,.0f} | 1.00 |",
             f"| `mlnb features materialize` (Feast: file offline store → SQLite online store) | {mat:.2f} | {a.rows / mat:,.0f} | {mat / hand:.2f} |",
             "", "## (b) Online lookups", "",
             "| what | ms per entity | × baseline |", "| --- | ---: | ---: |",
             f"| primary-key SELECT in the hand-made table (baseline) | {sel * 1000:.3f} | 1.00 |",
             f"| `online_features` (`mlnb features get`), one entity a call | {one * 1000:.2f} | {one / sel:.0f} |",
             f"| Feast `get_online_features`, one entity a call | {one_store * 1000:.2f} | {one_store / sel:.0f} |",
             f"| Feast `get_online_features`, 1,000 entities in one call | {batch * 1000 / len(keys):.3f} | {batch / len(keys) / sel:.1f} |",
             "", "## (c) Importing Feast (CPU seconds of a fresh process that has mlnb and pandas)", "",
             "| what | CPU s | × baseline |", "| --- | ---: | ---: |",
             f"| `import feast`: typeguard instruments every class at import (baseline) | {cpu['feast']:.2f} | 1.00 |",
             f"| mlnb, a process that only reads the store (a service's worker, `mlnb monitor`, lookups) | {cpu['mlnb']:.2f} | {cpu['mlnb'] / cpu['feast']:.2f} |",
             f"| mlnb, a process that runs the definitions (`mlnb features apply`): the checks of the classes they name instrumented then | {cpu['checked']:.2f} | {cpu['checked'] / cpu['feast']:.2f} |",
             "", f"Materialization: {a.rows / mat:,.0f} rows/s ({mat / hand:.1f} × the hand-made floor). A batch of requests should look "
             f"its entities up in one call: {batch * 1000 / len(keys):.3f} ms per entity against {one_store * 1000:.2f} ms one at a time. "
             f"A process that only reads the store imports Feast for {cpu['mlnb']:.2f} s of CPU instead of {cpu['feast']:.2f} s "
             f"({cpu['mlnb'] / cpu['feast']:.2f} ×), and one that runs the definitions for {cpu['checked']:.2f} s ({cpu['checked'] / cpu['feast']:.2f} ×): "
             "Feast's type checks are instrumented only where definitions run, for the classes they name."]
    text = "\n".join(lines) + "\n"
    print(text)
    Path(a.out).write_text(text)


if __name__ == "__main__":
    main()
