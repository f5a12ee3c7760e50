"""Commands against a shared MLflow tracking server (PostgreSQL behind it, artifacts proxied) against the default SQLite
store, measured in the same run (issue 13). Prints the server's time as a ratio of SQLite's.

Two copies of a `mlnb new --task binary` project, one on `sqlite:///.mlnb/mlflow.db` (the default), one on an
`mlflow server` started here (mlnb.stack's Postgres and MlflowServer, on 127.0.0.1: no network latency, so the ratios are
what the server's API and mlnb's client side cost). Each has two versions. Timed as a user types them, fresh processes,
alternating the two stores, median of N:

- `mlnb run`, fully cached (every stage reused; the register stage checks that its version is still in the registry);
- `mlnb models`, `mlnb promote` and `mlnb rollback` (alternating, so each one moves the champion);
- a register: the register stage's own duration in a run that trains a new model (a new `C` each round), as the run
  records it (log the model and its artifacts, register a version, compare with the champion, move the alias).

    .venv/bin/python bench/team.py [--repeat 3] [--out bench/RESULTS-team.md]
"""
import argparse, json, os, shutil, statistics, subprocess, sys, tempfile, time, uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE" and not k.startswith("MLNB_")} | {
    "MLFLOW_DISABLE_TELEMETRY": "true", "BENTOML_DO_NOT_TRACK": "true", "DO_NOT_TRACK": "true"}
MLNB = [str(Path(sys.executable).with_name("mlnb"))]


def sh(args, cwd, env=None, check=True):
    "Run a command; (seconds, stdout)."
    t = time.perf_counter()
    p = subprocess.run(args, cwd=cwd, env={**ENV, **(env or {})}, capture_output=True, text=True)
    if check and p.returncode: sys.exit(f"{' '.join(map(str, args))} failed ({p.returncode}):\n{p.stderr[-2000:]}")
    return time.perf_counter() - t, p.stdout


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "bench/RESULTS-team.md"))
    a = ap.parse_args()
    from mlnb.stack import Postgres, MlflowServer
    work = Path(tempfile.mkdtemp(prefix="mlnb-bench-team-"))
    pg = Postgres(work / "postgres").start()
    server = None
    try:
        server = MlflowServer(pg.create_database("mlflow"), work / "artifacts", log=work / "server.log").start()
        sh(MLNB + ["new", "local", "--task", "binary"], work)
        shutil.copytree(work / "local", work / "team")
        name = f"bench-{uuid.uuid4().hex[:6]}"
        envs = {"sqlite": {}, "server": {"MLNB_TRACKING_URI": server.uri, "MLNB_EXPERIMENT": name, "MLNB_MODEL_NAME": name}}
        dirs = {"sqlite": work / "local", "server": work / "team"}
        print("two versions in each store (four pipeline runs) ...", file=sys.stderr)
        for k in envs:
            sh(MLNB + ["run"], dirs[k], envs[k])
            sh(MLNB + ["run", "-p", "train.C=0.5"], dirs[k], envs[k])
        times = {}
        def timed(row, k, args):
            if (row, k) not in times: sh(args, dirs[k], envs[k])  # once untimed: compiled modules, page cache
            times.setdefault((row, k), []).append(sh(args, dirs[k], envs[k])[0])
        for i in range(a.repeat):
            for k in envs:  # alternating the stores, round after round: the machine's load drifts
                timed("run, fully cached", k, MLNB + ["run", "-p", "train.C=0.5"])
                timed("models", k, MLNB + ["models"])
                champion = next(v["version"] for v in json.loads(sh(MLNB + ["models", "--json"], dirs[k], envs[k])[1])["versions"] if "champion" in v["aliases"])
                times.setdefault(("rollback", k), []).append(sh(MLNB + ["rollback", "-m", f"bench {i}"], dirs[k], envs[k])[0])
                times.setdefault(("promote", k), []).append(sh(MLNB + ["promote", str(champion), "-m", f"bench {i}"], dirs[k], envs[k])[0])
                rec = json.loads(sh(MLNB + ["run", "-p", f"train.C={0.5 + 0.01 * (i + 1)}", "--json"], dirs[k], {**envs[k], "MLNB_GATE_MAX_REGRESSION": "1"})[1])
                times.setdefault(("a register (the stage)", k), []).append(rec["stages"]["register"]["duration"])
    finally:
        if server: server.stop()
        pg.stop()
    rows = list(dict.fromkeys(r for r, _ in times))
    med = {key: statistics.median(v) for key, v in times.items()}
    table = ["| command | SQLite (s) | server (s) | server / SQLite |", "|---|---:|---:|---:|"]
    table += [f"| {r} | {med[(r, 'sqlite')]:.3f} | {med[(r, 'server')]:.3f} | {med[(r, 'server')] / med[(r, 'sqlite')]:.2f} |" for r in rows]
    text = "\n".join(table)
    print(text)
    head = ["# Commands against a tracking server against SQLite (bench/team.py)", "",
            f"{time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores, median of {a.repeat} fresh processes per command, the two stores "
            "alternating; the server: `mlflow server` (1 worker) on a PostgreSQL, artifacts proxied, both on 127.0.0.1.", ""]
    if a.out: Path(a.out).write_text("\n".join(head) + "\n" + text + "\n")


if __name__ == "__main__":
    main()
