"""Benchmarks of the Dask executor (issue 13). Prints ratios against the local executor measured in the same run.

  (a) per-stage overhead: `mlnb run --force` of 5 trivial stages, local kernels vs. a Dask cluster of 2 workers on this
      machine (`dask scheduler` + 2 `dask worker` processes, as `mlnb stack` starts them);
  (b) the reference pipeline from cold (`mlnb run --force`): local vs. Dask;
  (c) a sweep of 8 trials on a `mlnb new --task binary` project (`--sweep C=...`, 8 values, new ones each round so that
      nothing is reused): serial (`--jobs 1`) vs. local `--jobs 2` vs. Dask with 2 workers (`--jobs 2 --scheduler`).

Runs alternate round-robin (the machine's load drifts); medians. Usage:
  .venv/bin/python bench/cluster.py [--repeat N] [--out bench/RESULTS-cluster.md]
"""
import argparse, os, shutil, statistics, subprocess, sys, tempfile, time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine import MLNB, ROOT, sh, timed, trivial_project, reference_project  # noqa: E402  (same projects as bench/engine.py)


def start_cluster(workers: int = 2):
    "A scheduler and `workers` single-threaded workers on 127.0.0.1 (mlnb.stack's DaskCluster); returns (address, stop)."
    from mlnb.stack import DaskCluster
    c = DaskCluster(Path(tempfile.mkdtemp(prefix="mlnb-bench-dask-")), workers=workers).start()
    return c.address, c.stop


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--sweeps", type=int, default=1, help="rounds of the sweep comparison (each round: 3 sweeps of 8 trials)")
    ap.add_argument("--out", default=str(ROOT / "bench/RESULTS-cluster.md"))
    a = ap.parse_args()
    address, stop = start_cluster(2)
    rows = []
    try:
        trivial = trivial_project()
        run = lambda d, *x: (lambda: sh(*MLNB, "--project", str(d), "run", "--force", *x, cwd=d))
        run(trivial)(); run(trivial, "--scheduler", address)()  # first runs make the stores and the workers' zygotes
        t = timed({"local": run(trivial), "dask": run(trivial, "--scheduler", address)}, a.repeat)
        per = {k: v[0] / 5 for k, v in t.items()}
        rows.append(("5 trivial stages, per stage", per["local"], per["dask"]))
        ref = reference_project()
        run(ref)()
        t = timed({"local": run(ref), "dask": run(ref, "--scheduler", address)}, a.repeat)
        rows.append(("reference pipeline, cold (`--force`)", t["local"][0], t["dask"][0]))
        new = Path(tempfile.mkdtemp(prefix="mlnb-bench-sweep-")) / "p"
        sh(*MLNB, "new", str(new), "--task", "binary")
        sh(*MLNB, "--project", str(new), "run")  # the stages before the sweep, once
        rnd = iter(range(1000))
        def sweep(*x):
            def go():
                k = next(rnd)  # values no earlier round used: every trial runs
                sh(*MLNB, "--project", str(new), "run", "--sweep", "C=" + ",".join(f"{0.01 * (i + 1) + k * 1e-6:.6f}" for i in range(8)), *x, cwd=new)
            return go
        t = timed({"serial": sweep("--jobs", "1"), "local2": sweep("--jobs", "2"), "dask2": sweep("--jobs", "2", "--scheduler", address)}, a.sweeps)
        sweeps = {k: v[0] for k, v in t.items()}
    finally:
        stop()
    lines = ["# Dask executor benchmarks (bench/cluster.py)", "",
             f"{time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores; median of {a.repeat}, runs alternated; "
             "Dask: a scheduler and 2 single-threaded workers on this machine.", "",
             "| measurement | local executor | Dask executor | Dask / local |", "|---|---:|---:|---:|"]
    lines += [f"| {name} | {l:.3f} s | {d:.3f} s | {d / l:.2f} × |" for name, l, d in rows]
    lines += ["", f"A sweep of 8 trials (`mlnb new --task binary`, `--sweep C=...`), median of {a.sweeps}:", "",
              "| sweep | wall time | / serial |", "|---|---:|---:|"]
    lines += [f"| {name} | {sweeps[k]:.1f} s | {sweeps[k] / sweeps['serial']:.2f} × |" for k, name in
              (("serial", "serial (`--jobs 1`)"), ("local2", "local, `--jobs 2`"), ("dask2", "Dask, 2 workers, `--jobs 2`"))]
    text = "\n".join(lines) + "\n"
    old = Path(a.out).read_text() if Path(a.out).exists() else ""
    if "## Notes" in old: text += "\n" + old[old.index("## Notes"):]
    Path(a.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
