"""Benchmarks of the pipeline engine (issues: foundation, 12). Prints ratios against baselines measured in the same run.

  (a) per-stage cost: `mlnb run` on 5 trivial stages vs. the same code as plain Python scripts and vs. bare
      papermill on each notebook; and where a stage's time goes (a kernel's start, a kernel forked from the run's
      zygote, papermill on a ready kernel, the wait for MLflow tracking);
  (b) a fully cached rerun of the reference pipeline;
  (c) the reference pipeline from cold (`mlnb run --force`: every stage executes) vs. bare papermill on each notebook
      and vs. the floor: the same stage code, parameters and injected context in one plain Python process.

Each kind of measurement is repeated round-robin with the others it is compared with (the machine's load drifts).
Hand-written notes below the tables in the results file (a `## Notes` section) are kept when it is rewritten.

Usage: .venv/bin/python bench/engine.py [--repeat N] [--out bench/RESULTS-engine.md]
       .venv/bin/python bench/engine.py --floor PROJECT   # the floor alone, on one project
"""
import argparse, json, os, shutil, statistics, subprocess, sys, tempfile, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for k in ("MLFLOW_DISABLE_TELEMETRY", "BENTOML_DO_NOT_TRACK", "DO_NOT_TRACK"): os.environ[k] = "true"
import logging; logging.getLogger("papermill").setLevel(logging.ERROR)  # "Passed unknown parameter: mlnb_context", for every notebook
# An installed mlnb has its modules compiled once; a shell with PYTHONDONTWRITEBYTECODE (this machine's sets it) would make every
# process the bench starts compile again what changed since the last cache. Compiled files go to an ignored folder instead.
os.environ.pop("PYTHONDONTWRITEBYTECODE", None); os.environ["PYTHONPYCACHEPREFIX"] = str(ROOT / "bench/.work/pycache")
sys.dont_write_bytecode, sys.pycache_prefix = False, os.environ["PYTHONPYCACHEPREFIX"]
MLNB = [sys.executable, "-c", "from mlnb.cli import main; main()"]
TRIVIAL = "from mlnb import stage\ny = sum(range(1000)) + n\nstage.save('out', {'y': y})"
SCRIPT = "import json, sys\nn = int(sys.argv[1])\ny = sum(range(1000)) + n\njson.dump({'y': y}, open(sys.argv[2], 'w'))"
STAGES = ["ingest", "examples", "validate", "features", "train", "evaluate", "gate", "register"]


def timed(fns: dict, repeat: int) -> dict:
    "name -> (median seconds, all runs): the functions of `fns` run round-robin, `repeat` times each."
    out = {k: [] for k in fns}
    for _ in range(repeat):
        for k, fn in fns.items():
            t0 = time.perf_counter(); fn(); out[k].append(time.perf_counter() - t0)
    return {k: (statistics.median(v), v) for k, v in out.items()}


def sh(*args, cwd=None, env=None):
    p = subprocess.run(args, cwd=cwd, capture_output=True, text=True, env=env)
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


def cpu_s(pid: int) -> float:
    "User and system CPU seconds a process has used so far."
    st = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(st[11]) + int(st[12])) / os.sysconf("SC_CLK_TCK")


def kernel_parts(d: Path, repeat: int) -> dict:
    "Where a trivial stage's time goes, each part alone: wall seconds and the CPU seconds of the processes it started (median)."
    import papermill as pm
    from jupyter_client.manager import KernelManager
    from mlnb.pipeline import KernelPool
    rows = {k: [] for k in ("a kernel as papermill starts it (ipykernel's launcher), until it answers",
                            "mlnb: the run's zygote and its first kernel, until it answers",
                            "mlnb: each further kernel, forked from the zygote, until it answers",
                            "papermill on a ready kernel, its client connected (one trivial notebook)")}
    names = list(rows)
    for _ in range(repeat):
        t0 = time.perf_counter()
        km = KernelManager(kernel_name="python3"); km.start_kernel(cwd=str(d / "pipeline"), stderr=subprocess.DEVNULL)
        kc = km.client(); kc.start_channels(); kc.wait_for_ready(timeout=60)
        rows[names[0]].append((time.perf_counter() - t0, cpu_s(km.provisioner.process.pid)))
        kc.stop_channels(); km.shutdown_kernel(now=True)
        pool = KernelPool("python3", d / "pipeline", dict(os.environ), 0, {})
        t0 = time.perf_counter(); first = pool.take("a"); t1 = time.perf_counter(); second = pool.take("b"); t2 = time.perf_counter()
        zygote = pool._zygote.proc.pid if pool._zygote else None
        rows[names[1]].append((t1 - t0, cpu_s(first.provisioner.process.pid) + (cpu_s(zygote) if zygote else 0)))
        rows[names[2]].append((t2 - t1, cpu_s(second.provisioner.process.pid)))
        t0 = time.perf_counter()
        pm.execute_notebook(str(d / "pipeline/s0.ipynb"), str(d / "ready.ipynb"), km=second, kernel_name="python3", progress_bar=False,
                            parameters={"n": 0, "mlnb_context": {"out_dir": str(d / "ready-out"), "upstream": {}}}, cwd=str(d / "pipeline"))
        rows[names[3]].append((time.perf_counter() - t0, None))
        pool.release(first); pool.release(second); pool.close()
    return {k: (statistics.median(w for w, _ in v), None if v[0][1] is None else statistics.median(c for _, c in v)) for k, v in rows.items()}


def bench_overhead(repeat):
    d = trivial_project()
    sh(*MLNB, "--project", d, "run", "--wait-tracking")  # warm the OS caches and the MLflow store once
    from mlnb.pipeline import _import_papermill
    _import_papermill()
    import papermill as pm
    from mlnb.config import load_config
    from mlnb.pipeline import run_pipeline, RunOptions, load_run
    def scripts():
        for i in range(5): sh(sys.executable, d / f"s{i}.py", str(i), d / f"out{i}.json")
    def papermill_each():
        for i in range(5):
            pm.execute_notebook(str(d / "pipeline" / f"s{i}.ipynb"), str(d / f"pm{i}.ipynb"), progress_bar=False, cwd=str(d / "pipeline"))
    def papermill_cli():
        for i in range(5): sh(sys.executable, "-m", "papermill", "--no-progress-bar", d / "pipeline" / f"s{i}.ipynb", d / f"pmc{i}.ipynb", cwd=d / "pipeline")
    cli_runs = []
    def mlnb_cli():
        t0 = time.time(); sh(*MLNB, "--project", d, "run", "--force"); t1 = time.time()
        rec = load_run(load_config(d), "latest")
        cli_runs.append((rec["started"] - t0, rec["ended"] - rec["started"], t1 - rec["ended"]))
    cfg = load_config(d)
    engine = lambda: run_pipeline(cfg, RunOptions(force=True), sync_tracking=False)
    rows = timed({"plain python scripts (5 processes)": scripts,
                  "bare papermill API, one process (5 notebooks)": papermill_each,
                  "bare papermill CLI (5 processes)": papermill_cli,
                  "mlnb engine in-process, no tracking (run_pipeline)": engine,
                  "mlnb run CLI, MLflow tracking included": mlnb_cli}, repeat)
    parts = kernel_parts(d, repeat)
    split = [statistics.median(x[i] for x in cli_runs) for i in range(3)]
    shutil.rmtree(d, ignore_errors=True)
    return rows, parts, split


def reference_project():
    d = Path(tempfile.mkdtemp(prefix="mlnb-bench-ref-"))
    shutil.copy(ROOT / "settings.ini", d / "settings.ini")
    shutil.copytree(ROOT / "nbs/pipeline", d / "nbs/pipeline")
    return d


def floor(project: Path) -> dict:
    """The reference pipeline's stage code run in this one process: every code cell of every stage notebook, in pipeline
    order, the parameters cell then what papermill's injected cell sets (the defaults and the stage's `mlnb_context`, as
    the engine makes it, `interactive` False: products are written and the model registered, in the project's own
    store). IPython's `InteractiveShell` runs the cells (no kernel, no ZMQ, no papermill) so `mlnb.stage` finds its
    context where it does in a kernel; each stage starts with an empty namespace. Returns the seconds of each stage."""
    from IPython.core.interactiveshell import InteractiveShell
    from traitlets.config import Config as Traits
    from mlnb.config import load_config
    from mlnb.pipeline import discover, new_run_id, resolve_params
    from mlnb.stage import trusted_types
    cfg = load_config(project)
    pipeline = discover(cfg.pipeline_dir)
    params = resolve_params(pipeline)
    run_id = new_run_id()
    run_dir = cfg.state / "floor" / run_id
    run_dir.mkdir(parents=True)
    (run_dir / "run.json").write_text(json.dumps({"run_id": run_id, "stages": {n: {"params": p} for n, p in params.items()}}))
    traits = Traits(); traits.HistoryManager.enabled = False
    shell = InteractiveShell.instance(config=traits)
    os.chdir(pipeline.folder)  # where the engine starts stage kernels
    outs, took = {}, {}
    for n, st in pipeline.stages.items():
        t0 = time.perf_counter()
        out = run_dir / n; out.mkdir()
        ctx = {"stage": n, "run_id": run_id, "run_dir": str(run_dir), "out_dir": str(out), "project": str(cfg.root),
               "git": {"commit": None, "dirty": None}, "upstream": {u: str(outs[u]) for u in st.upstream},
               "tracking_uri": cfg.tracking_uri, "experiment": cfg.experiment, "model_name": cfg.model_name,
               "interactive": False, "trusted_types": trusted_types(cfg)}
        shell.reset(new_session=False)
        for cell in json.loads(st.path.read_text())["cells"]:
            if cell["cell_type"] != "code": continue
            res = shell.run_cell("".join(cell["source"]), store_history=False)
            if not res.success: raise SystemExit(f"floor: stage {n} failed: {res.error_before_exec or res.error_in_exec!r}")
            if "parameters" in cell["metadata"].get("tags", []): shell.user_ns.update(params[n], mlnb_context=ctx)
        outs[n], took[n] = out, time.perf_counter() - t0
    return took


def bench_reference(repeat):
    d = reference_project()
    f = reference_project()  # the floor's own project: its own store, its own registry
    def bare():  # the same notebooks (STAGES) run by papermill one after another, each reading its upstream's latest products
        import papermill as pm
        os.environ["MLNB_PROJECT"] = str(d)
        try:
            for s in STAGES:
                pm.execute_notebook(str(d / "nbs/pipeline" / f"{s}.ipynb"), str(d / f"bare-{s}.ipynb"), progress_bar=False, cwd=str(d / "nbs/pipeline"))
        finally: os.environ.pop("MLNB_PROJECT")
    floors = []
    def floor_run():
        p = sh(sys.executable, __file__, "--floor", f)
        floors.append(json.loads(p.stdout.strip().splitlines()[-1]))
    from mlnb.config import load_config
    from mlnb.pipeline import list_runs, load_run
    splits = []
    def cold():
        t0 = time.time(); sh(*MLNB, "--project", d, "run", "--force"); t1 = time.time()
        rec = load_run(load_config(d), "latest")
        splits.append((rec["started"] - t0, rec["ended"] - rec["started"], t1 - rec["ended"]))
    rows = timed({"reference pipeline cold (mlnb run --force)": cold,
                  "reference pipeline, bare papermill on each notebook": bare,
                  "reference pipeline, floor: its stage code in one Python process": floor_run}, repeat)
    runs = [r for r in list_runs(load_config(d)) if r["options"]["force"]][:repeat]
    stage_s = {s: statistics.median(r["stages"][s]["duration"] for r in runs) for s in STAGES}  # medians, stage by stage
    floor_s = {s: statistics.median(x[s] for x in floors) for s in STAGES}
    split = [statistics.median(x[i] for x in splits) for i in range(3)]
    last = max((f / ".mlnb/floor").iterdir())  # the same products? their digests, stage by stage, against the engine's last run
    digests = lambda folder: {k: m["sha256"] for k, m in json.loads((Path(folder) / "products.json").read_text()).items()}
    same = {s: digests(last / s) == digests(runs[0]["stages"][s]["entry"]) for s in STAGES}
    from mlnb.pipeline import read_stage
    same = {s: "same" if v else "other bytes (a stage that says deterministic = False)" if not read_stage(d / f"nbs/pipeline/{s}.ipynb").deterministic
            else "OTHER BYTES" for s, v in same.items()}
    rows |= timed({"reference pipeline fully cached (mlnb run)": lambda: sh(*MLNB, "--project", d, "run"),
                   "python interpreter start (python -c pass)": lambda: sh(sys.executable, "-c", "pass")}, max(repeat, 5))
    time.sleep(6)  # let the background MLflow followers of the cached runs finish before removing the folders
    shutil.rmtree(d, ignore_errors=True); shutil.rmtree(f, ignore_errors=True)
    return rows, stage_s, floor_s, split, same


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "RESULTS-engine.md")
    ap.add_argument("--floor", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.floor:
        import contextlib, io
        with contextlib.redirect_stdout(io.StringIO()): took = floor(a.floor.resolve())  # what the cells display is not the result
        print(json.dumps(took)); return
    o, parts, split = bench_overhead(a.repeat)
    r, stage_s, floor_s, rsplit, same = bench_reference(a.repeat)
    per = {k: v[0] / 5 for k, v in o.items()}
    base_pm = per["bare papermill API, one process (5 notebooks)"]
    base_py = per["plain python scripts (5 processes)"]
    lines = [f"# Engine benchmarks ({time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores, median of {a.repeat})", "",
             "## (a) Per-stage cost, 5 trivial stages in a chain", "",
             "| what | total s | per stage s | × plain scripts | × bare papermill (API) | each run s |", "| --- | ---: | ---: | ---: | ---: | --- |"]
    for k, (med, each) in o.items():
        lines.append(f"| {k} | {med:.2f} | {med / 5:.3f} | {per[k] / base_py:.2f} | {per[k] / base_pm:.2f} | {', '.join(f'{x:.2f}' for x in each)} |")
    lines += ["", f"`mlnb run --force` CLI, split: {split[0]:.2f} s from the command to the run's start (interpreter, imports, checks), "
              f"{split[1]:.2f} s running the 5 stages, {split[2]:.2f} s from the run's end to the exit (waiting for MLflow tracking).", "",
              "Where a stage's time goes, each part measured alone:", "", "| part | wall s | kernel CPU s |", "| --- | ---: | ---: |"]
    for k, (wall, cpu) in parts.items():
        lines.append(f"| {k} | {wall:.3f} | {'' if cpu is None else f'{cpu:.2f}'} |")
    cold = r["reference pipeline cold (mlnb run --force)"][0]
    bare = r["reference pipeline, bare papermill on each notebook"][0]
    flo = r["reference pipeline, floor: its stage code in one Python process"][0]
    cached = r["reference pipeline fully cached (mlnb run)"][0]
    py = r["python interpreter start (python -c pass)"][0]
    runs = lambda k: ", ".join(f"{x:.2f}" for x in r[k][1])
    lines += ["", f"## (b) and (c) The reference pipeline ({len(STAGES)} stages)", "", "| what | s | ratio | each run s |", "| --- | ---: | --- | --- |",
              f"| (c) cold, `mlnb run --force` | {cold:.2f} | **{cold / flo:.2f} × the floor**; {cold / bare:.2f} × bare papermill on each notebook | {runs('reference pipeline cold (mlnb run --force)')} |",
              f"| bare papermill on each notebook (baseline) | {bare:.2f} | {bare / flo:.2f} × the floor | {runs('reference pipeline, bare papermill on each notebook')} |",
              f"| the floor: the stage code in one Python process (baseline) | {flo:.2f} | 1.00 | {runs('reference pipeline, floor: its stage code in one Python process')} |",
              f"| (b) fully cached, `mlnb run` | {cached:.3f} | {cached / cold:.4f} × cold; {cached / py:.1f} × `python -c pass` | |",
              f"| `python -c pass` (baseline) | {py:.3f} | 1.00 | |", "",
              f"Cold `mlnb run --force`, split: {rsplit[0]:.2f} s to the run's start, {rsplit[1]:.2f} s running the stages, "
              f"{rsplit[2]:.2f} s waiting for MLflow tracking after the run's end.", "",
              "Products of the floor against those of the engine's last cold run (SHA-256 of each): "
              + "; ".join(f"{s}: {v}" for s, v in same.items()) + ".", "",
              "Per stage, cold: the engine's stage time (its kernel's work from the first cell to the last, warm-up included) "
              "and the floor's (the same cells in the one process):", "",
              "| stage | `mlnb run --force` s | floor s |", "| --- | ---: | ---: |",
              *[f"| {s} | {stage_s[s]:.2f} | {floor_s[s]:.2f} |" for s in STAGES], "",
              "Targets: cold `mlnb run` at most 2 × the floor; fully cached rerun under 2 s; engine overhead per trivial stage "
              "below bare papermill's and at most 0.3 s."]
    text = "\n".join(lines) + "\n"
    print(text)
    notes = a.out.read_text().partition("\n## Notes")[1:] if a.out.exists() else ()
    a.out.write_text(text + "".join(notes))  # the notes written by hand below the tables stay


if __name__ == "__main__":
    main()
