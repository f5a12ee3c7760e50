"""Benchmarks of the pipeline engine (issue: foundation). Prints ratios against baselines measured in the same run.

  (a) per-stage overhead: `mlnb run` on 5 trivial stages vs. the same code as plain Python scripts and vs. bare
      papermill on each notebook;
  (b) a fully cached rerun of the reference pipeline;
  (c) the reference pipeline from cold.

Usage: .venv/bin/python bench/engine.py [--repeat N] [--out bench/RESULTS-engine.md]
"""
import argparse, os, shutil, statistics, subprocess, sys, tempfile, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for k in ("MLFLOW_DISABLE_TELEMETRY", "BENTOML_DO_NOT_TRACK", "DO_NOT_TRACK"): os.environ[k] = "true"
MLNB = [sys.executable, "-c", "from mlnb.cli import main; main()"]
TRIVIAL = "from mlnb import stage\ny = sum(range(1000)) + n\nstage.save('out', {'y': y})"
SCRIPT = "import json, sys\nn = int(sys.argv[1])\ny = sum(range(1000)) + n\njson.dump({'y': y}, open(sys.argv[2], 'w'))"


def timed(fn, repeat):
    out = []
    for _ in range(repeat):
        t0 = time.perf_counter(); fn(); out.append(time.perf_counter() - t0)
    return statistics.median(out), out


def sh(*args, cwd=None):
    p = subprocess.run(args, cwd=cwd, capture_output=True, text=True)
    if p.returncode: raise SystemExit(f"{' '.join(map(str, args))} failed:\n{p.stderr[-3000:]}")
    return p


def trivial_project():
    from mlnb.pipeline import write_stage
    d = Path(tempfile.mkdtemp(prefix="mlnb-bench-"))
    (d / "settings.ini").write_text("[mlnb]\npipeline = pipeline\nexperiment = bench\nprestart = 1\n")
    (d / "pipeline").mkdir()
    for i in range(5):
        write_stage(d / "pipeline" / f"s{i}.ipynb", f"upstream = {[f's{i-1}'] if i else []}\nn = {i}", TRIVIAL)
        (d / f"s{i}.py").write_text(SCRIPT)
    return d


def bench_overhead(repeat):
    d = trivial_project()
    sh(*MLNB, "--project", d, "run", "--wait-tracking")  # warm the OS caches and the MLflow store once
    scripts = lambda: [sh(sys.executable, d / f"s{i}.py", str(i), d / f"out{i}.json") for i in range(5)]
    import papermill as pm
    def papermill_each():
        for i in range(5):
            pm.execute_notebook(str(d / "pipeline" / f"s{i}.ipynb"), str(d / f"pm{i}.ipynb"), progress_bar=False, cwd=str(d / "pipeline"))
    def papermill_cli():
        for i in range(5): sh(sys.executable, "-m", "papermill", "--no-progress-bar", d / "pipeline" / f"s{i}.ipynb", d / f"pmc{i}.ipynb", cwd=d / "pipeline")
    mlnb_cli = lambda: sh(*MLNB, "--project", d, "run", "--force")
    from mlnb.config import load_config
    from mlnb.pipeline import run_pipeline, RunOptions
    cfg = load_config(d)
    engine = lambda: run_pipeline(cfg, RunOptions(force=True), sync_tracking=False)
    rows = {}
    rows["plain python scripts (5 processes)"] = timed(scripts, repeat)
    rows["bare papermill API, one process (5 notebooks)"] = timed(papermill_each, repeat)
    rows["bare papermill CLI (5 processes)"] = timed(papermill_cli, repeat)
    rows["mlnb engine in-process, no tracking (run_pipeline)"] = timed(engine, repeat)
    rows["mlnb run CLI, MLflow tracking included"] = timed(mlnb_cli, repeat)
    shutil.rmtree(d, ignore_errors=True)
    return rows


def reference_project():
    d = Path(tempfile.mkdtemp(prefix="mlnb-bench-ref-"))
    shutil.copy(ROOT / "settings.ini", d / "settings.ini")
    shutil.copytree(ROOT / "nbs/pipeline", d / "nbs/pipeline")
    return d


def bench_reference(repeat):
    d = reference_project()
    cold = lambda: sh(*MLNB, "--project", d, "run", "--force")
    rows = {"reference pipeline cold (mlnb run --force)": timed(cold, repeat)}
    def bare():  # the same six notebooks run by papermill one after another, each reading its upstream's latest products
        import papermill as pm
        for s in ["ingest", "validate", "features", "train", "evaluate", "gate", "register"]:
            pm.execute_notebook(str(d / "nbs/pipeline" / f"{s}.ipynb"), str(d / f"bare-{s}.ipynb"), progress_bar=False, cwd=str(d / "nbs/pipeline"))
    os.environ["MLNB_PROJECT"] = str(d)
    rows["reference pipeline, bare papermill on each notebook"] = timed(bare, repeat)
    os.environ.pop("MLNB_PROJECT")
    cached = lambda: sh(*MLNB, "--project", d, "run")
    rows["reference pipeline fully cached (mlnb run)"] = timed(cached, max(repeat, 5))
    rows["python interpreter start (python -c pass)"] = timed(lambda: sh(sys.executable, "-c", "pass"), max(repeat, 5))
    time.sleep(6)  # let the background MLflow followers of the cached runs finish before removing the folder
    shutil.rmtree(d, ignore_errors=True)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "RESULTS-engine.md")
    a = ap.parse_args()
    o = bench_overhead(a.repeat)
    r = bench_reference(a.repeat)
    per = {k: v[0] / 5 for k, v in o.items()}
    base_pm = per["bare papermill API, one process (5 notebooks)"]
    base_py = per["plain python scripts (5 processes)"]
    lines = [f"# Engine benchmarks ({time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores, median of {a.repeat})", "",
             "## (a) Per-stage cost, 5 trivial stages in a chain", "",
             "| what | total s | per stage s | × plain scripts | × bare papermill (API) |", "| --- | ---: | ---: | ---: | ---: |"]
    for k, (med, _) in o.items():
        lines.append(f"| {k} | {med:.2f} | {med / 5:.3f} | {per[k] / base_py:.2f} | {per[k] / base_pm:.2f} |")
    cold = r["reference pipeline cold (mlnb run --force)"][0]
    bare = r["reference pipeline, bare papermill on each notebook"][0]
    cached = r["reference pipeline fully cached (mlnb run)"][0]
    py = r["python interpreter start (python -c pass)"][0]
    lines += ["", "## (b) and (c) The reference pipeline (7 stages)", "", "| what | s | ratio |", "| --- | ---: | --- |",
              f"| (c) cold, `mlnb run --force` | {cold:.2f} | {cold / bare:.2f} × bare papermill on each notebook |",
              f"| bare papermill on each notebook (baseline) | {bare:.2f} | 1.00 |",
              f"| (b) fully cached, `mlnb run` | {cached:.3f} | {cached / cold:.4f} × cold; {cached / py:.1f} × `python -c pass` |",
              f"| `python -c pass` (baseline) | {py:.3f} | 1.00 |", "",
              "Targets: fully cached rerun under 2 s; reference pipeline cold under 60 s; engine overhead per stage no more "
              "than bare papermill's (aim: 0.3 s or less)."]
    text = "\n".join(lines) + "\n"
    print(text)
    a.out.write_text(text)


if __name__ == "__main__":
    main()
