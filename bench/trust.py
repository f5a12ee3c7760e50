"""What the digest check costs per model load.

Baseline: `skops.io.load` of the model file alone (what loading costs without any check). Measured: `mlnb.tracking.load_verified`
(digest of the file's canonical form, the type check, then the same load). Both in this run, median of N, for a small linear
model, the reference-sized gradient boosting model and a 200-tree random forest. Prints the ratio verified / baseline.

    .venv/bin/python bench/trust.py [--repeat 7]
"""
import argparse, os, statistics, tempfile, time
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def models():
    from sklearn.datasets import make_classification
    from sklearn.ensemble import HistGradientBoostingClassifier, RandomForestClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    X, y = make_classification(20_000, 20, random_state=0)
    yield "logistic regression", make_pipeline(StandardScaler(), LogisticRegression(max_iter=500)).fit(X, y)
    yield "hist gradient boosting (200 iters)", HistGradientBoostingClassifier(max_iter=200, random_state=0).fit(X, y)
    yield "random forest (200 trees)", RandomForestClassifier(200, max_depth=12, random_state=0, n_jobs=1).fit(X, y)


def median_time(fn, repeat):
    ts = []
    for _ in range(repeat):
        t = time.perf_counter(); fn(); ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def main():
    ap = argparse.ArgumentParser(); ap.add_argument("--repeat", type=int, default=7); a = ap.parse_args()
    import skops.io as sio
    from mlnb import stage
    from mlnb.tracking import load_verified, trusted_types
    print(f"{'model':36} {'file MB':>8} {'skops load (baseline)':>22} {'verified load':>14} {'ratio':>6} {'digest alone':>13}")
    for name, m in models():
        d = Path(tempfile.mkdtemp())
        stage._write(m, d / "model")
        f = d / "model.skops"
        digest = stage.skops_digest(f)
        types = sio.get_untrusted_types(file=f)
        base = median_time(lambda: sio.load(f, trusted=types), a.repeat)
        verified = median_time(lambda: load_verified(f, digest, trusted_types()), a.repeat)
        dig = median_time(lambda: stage.skops_digest(f), a.repeat)
        print(f"{name:36} {f.stat().st_size / 1e6:8.2f} {base * 1e3:19.1f} ms {verified * 1e3:11.1f} ms {verified / base:6.2f} {dig * 1e3:10.1f} ms")


if __name__ == "__main__":
    main()
