"""How fast the registry views and moves answer, against `mlnb status` in the same run.

Baseline: `mlnb status` (reads the newest run record, imports no ML library). Measured, each as a user types it, in a
fresh process, median of N: `models`, `models --history`, `card`, `lineage champion`, `rollback` and `promote`
(alternating, so each one really moves the champion), and `build` (once, it writes a bento). A second baseline shows
what the same registry read costs through MLflow's client (`import mlflow` + `search_model_versions`), which is how
`models` read the registry before. Targets (issue 11): `models` < 0.5 s, `promote`/`rollback` < 1 s on an idle machine.

    .venv/bin/python bench/registry.py [--repeat 5] [--project DIR] [--no-build]

Without --project it makes a project with `mlnb new` in a temporary folder and runs its pipeline twice (two versions).
"""
import argparse, json, os, statistics, subprocess, sys, tempfile, time
from pathlib import Path

# as on a user's machine: Python keeps compiled modules (a shell with PYTHONDONTWRITEBYTECODE would time the compiler)
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"} | {
    "MLFLOW_DISABLE_TELEMETRY": "true", "BENTOML_DO_NOT_TRACK": "true", "DO_NOT_TRACK": "true"}
MLNB = [str(Path(sys.executable).with_name("mlnb"))]


def sh(args, cwd, check=True):
    t = time.perf_counter()
    p = subprocess.run(args, cwd=cwd, env=ENV, capture_output=True, text=True)
    if check and p.returncode: sys.exit(f"{' '.join(args)} failed ({p.returncode}):\n{p.stderr[-2000:]}")
    return time.perf_counter() - t


def make_project(root: Path) -> Path:
    sh(MLNB + ["new", "regbench", "--task", "binary"], root)
    proj = root / "regbench"
    s = proj / "settings.ini"
    s.write_text(s.read_text().replace("gate_max_regression = 0.02", "gate_max_regression = 0.5"))
    print("making two versions (two pipeline runs)...", file=sys.stderr)
    sh(MLNB + ["run"], proj)
    sh(MLNB + ["run", "-p", "train.C=0.5"], proj)
    return proj


def median(fn, repeat):
    return statistics.median(fn() for _ in range(repeat))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--project", type=Path)
    ap.add_argument("--no-build", action="store_true")
    a = ap.parse_args()
    proj = a.project or make_project(Path(tempfile.mkdtemp(prefix="mlnb-bench-registry-")))
    uri = f"sqlite:///{proj / '.mlnb' / 'mlflow.db'}"
    name = json.loads(subprocess.run(MLNB + ["models", "--json"], cwd=proj, env=ENV, capture_output=True, text=True).stdout)["model"]
    client_read = [sys.executable, "-c", "import mlflow, sys; c = mlflow.MlflowClient(sys.argv[1], sys.argv[1]); "
                   "c.get_registered_model(sys.argv[2]); list(c.search_model_versions(f\"name = '{sys.argv[2]}'\"))", uri, name]
    rows = [("status (baseline)", MLNB + ["status"]), ("MLflow client read (baseline)", client_read),
            ("models", MLNB + ["models"]), ("models --history", MLNB + ["models", "--history"]), ("card", MLNB + ["card"]),
            ("lineage champion", MLNB + ["lineage", "champion"])]
    for _, cmd in rows: sh(cmd, proj)  # once untimed: compiled modules written, files in the page cache
    times = {name: median(lambda: sh(cmd, proj), a.repeat) for name, cmd in rows}
    moves = {"rollback": [], "promote": []}
    for i in range(a.repeat):
        moves["rollback"].append(sh(MLNB + ["rollback", "-m", f"bench {i}"], proj))
        champion = subprocess.run(MLNB + ["models", "--json"], cwd=proj, env=ENV, capture_output=True, text=True).stdout
        newest = max(v["version"] for v in json.loads(champion)["versions"])
        moves["promote"].append(sh(MLNB + ["promote", str(newest), "-m", f"bench {i}"], proj))
    times.update({k: statistics.median(v) for k, v in moves.items()})
    if not a.no_build: times["build"] = sh(MLNB + ["build"], proj)
    base = times["status (baseline)"]
    target = {"models": 0.5, "promote": 1.0, "rollback": 1.0}
    print(f"{'command':32} {'median s':>9} {'/ status':>9} {'target':>8}")
    for name, t in times.items():
        print(f"{name:32} {t:9.3f} {t / base:9.2f} {('< %.1f s' % target[name]) if name in target else '':>8}"
              + ("  " + ("met" if t < target[name] else "MISSED") if name in target else ""))


if __name__ == "__main__":
    main()
