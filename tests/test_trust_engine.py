"""The engine under bad luck and tampering (issue 10): a run always ends, nothing reused is trusted blindly, the registry is
the truth, and a resumed run keeps its options and its history. Real kernels, real papermill, the real CLI."""
import json, os, signal, subprocess, sys, time
import pytest
from pathlib import Path
from conftest import MLNB, add_stage, run_json, run_mlnb, statuses
from mlnb.pipeline import KILL_GRACE

STUBBORN = "import time\ntry: time.sleep(600)\nexcept KeyboardInterrupt: time.sleep(600)"  # a cell that ignores Ctrl-C


def start_run(project, *args):
    before = {p.name for p in (project / ".mlnb/runs").glob("*")}
    proc = subprocess.Popen([*MLNB, "--project", str(project), "run", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return proc, before


def wait_running(project, before, stage, timeout=120):
    "The record file of the new run, once `stage` runs in it."
    deadline = time.time() + timeout
    while time.time() < deadline:
        for p in (project / ".mlnb/runs").glob("*/run.json"):
            if p.parent.name in before: continue
            try:
                if json.loads(p.read_text())["stages"][stage]["status"] == "running": return p
            except (ValueError, KeyError): pass
        time.sleep(0.2)
    raise AssertionError(f"stage {stage} never ran")


def error_lines(stderr):
    return [l for l in stderr.splitlines() if l.startswith("mlnb: error")]


def flip(path, at=200, n=64):
    data = bytearray(Path(path).read_bytes())
    for i in range(at, at + n): data[i] ^= 0xFF
    Path(path).write_bytes(bytes(data))


def audit_events(project, kind):
    from mlnb import audit
    from mlnb.config import load_config
    return [e for e in audit.events(load_config(project)) if e["kind"] == kind]


# --- a run always ends ---------------------------------------------------------------------------------------------

def test_a_killed_kernel_fails_its_stage_within_seconds(project):
    "kill -9 of a stage's kernel hung `mlnb run` for 33 minutes; now the stage fails at once, saying its kernel died."
    add_stage(project, "train", "upstream = []",
              "import os, pathlib\npathlib.Path(os.environ['MLNB_PROJECT'], 'kernel.pid').write_text(str(os.getpid()))",
              "import time\nprint('training')\ntime.sleep(600)")
    proc, before = start_run(project)
    pidfile = project / "kernel.pid"
    deadline = time.time() + 120
    while not pidfile.exists() and time.time() < deadline: time.sleep(0.1)
    time.sleep(1)
    os.kill(int(pidfile.read_text()), signal.SIGKILL)
    t0 = time.time()
    out, err = proc.communicate(timeout=60)
    took = time.time() - t0
    assert proc.returncode == 1, err
    assert took < 20, f"the run took {took:.1f}s to end after its kernel died"
    lines = error_lines(err)
    assert len(lines) == 1 and len(err.strip().splitlines()) <= 4, err
    assert "stage 'train' failed in code cell 3 of train.ipynb (the cell starting `import time`): KernelDied: its kernel died (killed by signal 9: kill -9 or out of memory)" in lines[0], lines[0]
    nb_path = project / lines[0].split("executed notebook: ")[1].rstrip(")")  # relative to the project, as JupyterLab opens it
    nb = json.loads(nb_path.read_text())
    marked = [c for c in nb["cells"] if any(o.get("ename") == "KernelDied" for o in c.get("outputs", []))]
    assert len(marked) == 1 and "time.sleep(600)" in "".join(marked[0]["source"])
    assert any("training" in "".join(o.get("text", "")) for o in marked[0]["outputs"]), "what the cell printed is kept"
    assert any("papermill-error-cell-tag" in c["metadata"].get("tags", []) for c in nb["cells"])
    rec = json.loads((project / ".mlnb/runs" / nb_path.parent.name / "run.json").read_text())
    assert rec["status"] == "failed" and rec["stages"]["train"]["status"] == "failed"
    assert not [p for p in (project / ".mlnb/cache/train").iterdir()], "no half product left behind"


def test_a_kernel_that_dies_says_why_and_kernels_listen_on_no_port(project, tmp_path_factory):
    """A kernel that ends itself (a crashing C extension, `os._exit`) fails its stage with the last line it wrote to stderr,
    and one that dies as it starts says so too. Stage kernels talk over Unix sockets in a private folder, not TCP ports: two
    runs starting kernels at once raced for ports and a kernel died at its start (papermill#511); the folder goes with the run."""
    add_stage(project, "probe", "upstream = []",
              "import os, pathlib\nfrom ipykernel.connect import get_connection_info\n"
              "pathlib.Path(os.environ['MLNB_PROJECT'], 'conn.json').write_text(get_connection_info())")
    add_stage(project, "crash", 'upstream = ["probe"]', "import os\nos.write(2, b'Fatal Python error: out of cheese\\n')\nos._exit(7)")
    run_mlnb(project, "run", check=1)
    rec = json.loads(next((project / ".mlnb/runs").glob("*/run.json")).read_text())
    assert statuses(rec) == {"probe": "done", "crash": "failed"}
    assert "KernelDied: its kernel died (exited with code 7; it said: Fatal Python error: out of cheese)" in rec["stages"]["crash"]["error"]
    conn = json.loads((project / "conn.json").read_text())
    assert conn["transport"] == "ipc" and conn["shell_port"] < 10, conn  # socket files numbered 1-5 beside the connection file
    assert not Path(conn["ip"]).parent.exists(), "the run's kernel folder (connection files, sockets, logs) is removed"
    # a kernel that cannot start: its own words are in the error
    spec = tmp_path_factory.mktemp("jupyter") / "kernels" / "broken"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({"argv": [sys.executable, "-c", "import sys; sys.stderr.write('no licence for this kernel\\n'); sys.exit(3)",
                                                           "-f", "{connection_file}"], "display_name": "broken", "language": "python"}))
    p = run_mlnb(project, "run", "--force", env={"JUPYTER_PATH": str(spec.parent.parent), "MLNB_KERNEL": "broken"}, check=1)
    assert "cannot start the Jupyter kernel 'broken': Kernel died (it said: no licence for this kernel)" in p.stderr, p.stderr


@pytest.mark.slow
def test_the_timeout_escalates_and_a_caught_interrupt_is_not_done(project):
    "One interrupt at the timeout let a cell that catches KeyboardInterrupt run on and count as done."
    add_stage(project, "stubborn", "upstream = []", STUBBORN, "from mlnb import stage\nstage.save('x', {'x': 1})")
    add_stage(project, "goes_on", "upstream = []", "import time\ntry: time.sleep(600)\nexcept KeyboardInterrupt: pass",
              "from mlnb import stage\nstage.save('x', {'x': 2})")
    add_stage(project, "ends", "upstream = []", "from mlnb import stage\nstage.save('early', {'x': 3})",
              "import time\ntry: time.sleep(600)\nexcept KeyboardInterrupt: pass")
    t0 = time.time()
    p = run_mlnb(project, "run", "--timeout", "5", "--jobs", "3", check=1)
    assert time.time() - t0 < 5 + KILL_GRACE + 40
    rec = json.loads(next((project / ".mlnb/runs").glob("*/run.json")).read_text())
    assert statuses(rec) == {"ends": "failed", "goes_on": "failed", "stubborn": "failed"}
    errs = {n: s["error"] for n, s in rec["stages"].items()}
    assert f"Timeout: ran longer than its timeout of 5 s and was interrupted; it did not stop, so its kernel was killed after {KILL_GRACE:g} s" in errs["stubborn"]
    assert "Timeout: ran longer than its timeout of 5 s and was interrupted; no further cell ran" in errs["goes_on"]
    assert "but went on to its end (a cell caught the interrupt); a stage past its timeout is not done" in errs["ends"]
    assert 5 + KILL_GRACE - 1 < rec["stages"]["stubborn"]["duration"] < 5 + KILL_GRACE + 15
    for n in ("stubborn", "goes_on", "ends"):  # nothing of a timed-out stage is kept for reuse
        assert not list((project / ".mlnb/cache" / n).iterdir())
    nb = json.loads((project / ".mlnb/runs" / rec["run_id"] / "notebooks/goes_on.ipynb").read_text())
    assert nb["cells"][-1].get("execution_count") is None, "the cell after the caught interrupt never ran"
    assert len(error_lines(p.stderr)) == 1 and "timeout of 5 s" in error_lines(p.stderr)[0]


def interrupt(project, times):
    "Start a run whose second stage ignores Ctrl-C, send SIGINT `times` times; returns the process output, seconds it took, the record."
    add_stage(project, "a", "upstream = []", "from mlnb import stage\nstage.save('v', {'v': 1})")
    add_stage(project, "stubborn", "upstream = ['a']", STUBBORN)
    proc, before = start_run(project)
    recfile = wait_running(project, before, "stubborn")
    time.sleep(1.5)
    t0 = time.time()
    proc.send_signal(signal.SIGINT)
    if times > 1: time.sleep(0.3); proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    return proc.returncode, err, time.time() - t0, json.loads(recfile.read_text())


def test_a_second_ctrl_c_kills_at_once(project):
    "Ctrl-C twice did nothing while a stage's cell ignored KeyboardInterrupt; only SIGTERM ended the run."
    code, err, took, rec = interrupt(project, 2)
    assert code == 130, err
    assert took < 5, f"two Ctrl-C took {took:.1f}s to end the run"
    assert "interrupted" in err and "--resume" in err
    assert rec["status"] == "interrupted" and statuses(rec) == {"a": "done", "stubborn": "interrupted"}
    assert (project / ".mlnb/runs" / rec["run_id"] / "notebooks/stubborn.ipynb").exists()


@pytest.mark.slow
def test_one_ctrl_c_ends_a_stubborn_stage_after_the_grace_and_the_run_resumes(project):
    code, err, took, rec = interrupt(project, 1)
    assert code == 130, err
    assert took < KILL_GRACE + 10, f"Ctrl-C took {took:.1f}s to end the run"
    assert rec["status"] == "interrupted" and rec["stages"]["stubborn"]["status"] == "interrupted"
    add_stage(project, "stubborn", "upstream = ['a']", "from mlnb import stage\nstage.save('ok', {'ok': True})")
    resumed = run_json(project, "run", "--resume")
    assert resumed["run_id"] == rec["run_id"] and statuses(resumed) == {"a": "done", "stubborn": "done"}
    assert [a["status"] for a in resumed["attempts"]] == ["interrupted", "done"]


# --- nothing reused is trusted blindly -----------------------------------------------------------------------------

def data_chain(project):
    add_stage(project, "ingest", "upstream = []\nrows = 5000",
              "import numpy as np, pandas as pd\nfrom mlnb import stage\n"
              "stage.save('train', pd.DataFrame({'x': np.arange(rows, dtype=float), 'y': np.arange(rows) % 2}))")
    add_stage(project, "train", "upstream = ['ingest']",
              "from mlnb import stage\ndf = stage.load('train')\nstage.save('fit', {'mean': float(df['x'].mean()), 'rows': len(df)})")


@pytest.mark.slow
def test_a_corrupt_cached_product_is_not_reused(project):
    "64 flipped bytes in a cached train.parquet gave '0 ran, 7 reused'; now the stage runs again and the run says why."
    data_chain(project)
    first = run_json(project, "run")
    entry = Path(first["stages"]["ingest"]["entry"])
    flip(entry / "train.parquet")
    p = run_mlnb(project, "run", "--json", check=0)
    rec = json.loads(p.stdout)
    assert statuses(rec) == {"ingest": "done", "train": "cached"}, "the rerun made the same bytes: train is reused"
    said = [l.split() for l in p.stderr.splitlines() if "!" in l]
    assert said == ["[1/2] ingest ! cached products changed on disk (train.parquet: digest mismatch); running it again".split()], p.stderr
    assert rec["stages"]["ingest"]["notes"] == ["cached products changed on disk (train.parquet: digest mismatch); running it again"]
    assert "      note      cached products changed on disk (train.parquet: digest mismatch); running it again" in run_mlnb(project, "show", check=0).stdout
    assert Path(rec["stages"]["ingest"]["entry"]) == entry and (entry / "manifest.json").exists()
    aside = list(entry.parent.glob(f".refused-{entry.name}-*"))
    assert len(aside) == 1, "the corrupt entry is kept aside as evidence"
    ev = audit_events(project, "stage.reuse_refused")
    assert len(ev) == 1 and ev[0]["refs"]["stage"] == "ingest" and "train.parquet: digest mismatch" in ev[0]["data"]["why"]
    assert statuses(run_json(project, "run")) == {"ingest": "cached", "train": "cached"}


@pytest.mark.slow
def test_only_reruns_a_corrupt_upstream_instead_of_reading_it(project):
    "A later `--only train` trained on the corrupt file."
    data_chain(project)
    first = run_json(project, "run")
    f = Path(first["stages"]["ingest"]["entry"]) / "train.parquet"
    f.write_bytes(f.read_bytes()[:-100])  # truncated
    p = run_mlnb(project, "run", "--only", "train", "--force", "--json", check=0)
    rec = json.loads(p.stdout)
    assert statuses(rec) == {"ingest": "done", "train": "done"}
    assert "bytes instead of" in p.stderr
    assert json.loads((Path(rec["stages"]["train"]["entry"]) / "fit.json").read_text()) == {"mean": 2499.5, "rows": 5000}


def test_stage_load_refuses_a_product_changed_under_it(project):
    "The stage API checks what it reads against products.json, also when a file changes after the engine checked it."
    data_chain(project)
    add_stage(project, "train", "upstream = ['ingest']",
              "from mlnb import stage\nfrom pathlib import Path\n"
              "f = Path(stage.context()['upstream']['ingest']) / 'train.parquet'\nb = bytearray(f.read_bytes()); b[300] ^= 1\n"
              "f.unlink(); f.write_bytes(bytes(b))",
              "stage.load('train')")
    p = run_mlnb(project, "run", check=1)
    lines = error_lines(p.stderr)
    assert len(lines) == 1, p.stderr
    assert "ValidationError: product 'train' of stage 'ingest': train.parquet has digest" in lines[0]
    assert "it changed after its stage wrote it, so it was not read" in lines[0]


@pytest.mark.slow
def test_skops_types_come_from_the_reviewed_list_not_from_products_json(project):
    "products.json's `trusted` list is a file anyone could edit: a model holding a type nobody reviewed is refused."
    add_stage(project, "train", "upstream = []",
              "import operator\nfrom sklearn.preprocessing import FunctionTransformer\nfrom mlnb import stage\n"
              "stage.save('model', FunctionTransformer(operator.neg))")  # a function the file names, loaded by import
    add_stage(project, "evaluate", "upstream = ['train']",
              "import numpy as np\nfrom mlnb import stage\nm = stage.load('model')\nstage.save('y', {'y': float(m.transform(np.array([[2.0]]))[0][0])})")
    p = run_mlnb(project, "run", check=1)
    rec = json.loads(next((project / ".mlnb/runs").glob("*/run.json")).read_text())
    prods = json.loads((Path(rec["stages"]["train"]["entry"]) / "products.json").read_text())
    assert prods["model"]["trusted"] == ["_operator.neg"], "products.json lists it: the old loader trusted that list"
    lines = error_lines(p.stderr)
    assert len(lines) == 1 and "ModelRefused: model.skops holds types nobody has reviewed: _operator.neg" in lines[0], p.stderr
    assert "add `trusted_types = _operator.neg` to settings.ini [mlnb]" in lines[0]
    # once someone reviewed it and said so in the project's settings, it loads
    with open(project / "settings.ini", "a") as f: f.write("trusted_types = _operator.neg\n")
    rec = run_json(project, "run")
    assert statuses(rec) == {"train": "cached", "evaluate": "done"}
    assert json.loads((Path(rec["stages"]["evaluate"]["entry"]) / "y.json").read_text()) == {"y": -2.0}


@pytest.mark.slow
def test_leftovers_of_a_killed_run_are_cleaned(project):
    "kill -9 of `mlnb run` left its stage's private .tmp-* folder behind for ever."
    add_stage(project, "slow", "upstream = []", "from mlnb import stage\nstage.save('half', {'x': 1})",
              "import os, pathlib\npathlib.Path(os.environ['MLNB_PROJECT'], 'kernel.pid').write_text(str(os.getpid()))",
              "import time\ntime.sleep(600)")
    proc, before = start_run(project)
    wait_running(project, before, "slow")
    deadline = time.time() + 60
    while not list((project / ".mlnb/cache/slow").glob(".tmp-*/half.json")) and time.time() < deadline: time.sleep(0.2)
    proc.kill(); proc.communicate(timeout=30)
    deadline = time.time() + 30
    while not (project / "kernel.pid").exists() and time.time() < deadline: time.sleep(0.2)
    try: os.kill(int((project / "kernel.pid").read_text()), signal.SIGKILL)  # its orphaned kernel
    except (OSError, ValueError): pass
    left = list((project / ".mlnb/cache/slow").glob(".tmp-*"))
    assert len(left) == 1
    # another run's live folder (this test process is alive) is left alone
    live = project / ".mlnb/cache/slow" / f".tmp-{left[0].name.split('-', 1)[1].rsplit('-', 2)[0]}-{os.getpid()}-abcdef"
    live.mkdir()
    add_stage(project, "slow", "upstream = []", "from mlnb import stage\nstage.save('half', {'x': 1})")
    rec = run_json(project, "run", "--resume")
    assert statuses(rec) == {"slow": "done"}
    assert not left[0].exists() and rec["cleaned"] == [str(left[0])]
    assert live.exists()


# --- the registry is the truth -------------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_cached_register_stage_whose_version_was_lost_runs_again(project):
    "After mlflow.db was lost, the next run reused the cached register stage: the registry stayed empty with rc 0."
    from mlnb import tracking
    from mlnb.config import load_config
    add_stage(project, "register", "upstream = []",
              "from sklearn.datasets import load_breast_cancer\nfrom sklearn.linear_model import LogisticRegression\n"
              "from mlnb import tracking\nX, y = load_breast_cancer(return_X_y=True, as_frame=True)\n"
              "tracking.register_model(LogisticRegression(max_iter=5000).fit(X, y), X)")
    run_json(project, "run", timeout=600)
    assert statuses(run_json(project, "run")) == {"register": "cached"}, "while the version is there, the stage is reused"
    (project / ".mlnb" / "mlflow.db").unlink()
    p = run_mlnb(project, "run", "--json", check=0, timeout=600)
    rec = json.loads(p.stdout)
    assert statuses(rec) == {"register": "done"}
    assert "its registered model test-model version 1 is not in the registry any more; running it again" in p.stderr
    cfg = load_config(project)
    assert [v["version"] for v in tracking.list_versions(cfg)] == [1]


# --- a resumed run keeps its options and its history ---------------------------------------------------------------

@pytest.mark.slow
def test_resume_of_a_forced_run_keeps_force_and_history(chain):
    "`--resume` of a `--force` run dropped `--force` and rewrote the run's record so it read '0 ran, 7 reused'."
    run_json(chain, "run")
    add_stage(chain, "c", "upstream = ['b']", "raise ValueError('not yet')")
    p = run_mlnb(chain, "run", "--force", "-p", "factor=2", check=1)
    rec = max((json.loads(f.read_text()) for f in (chain / ".mlnb/runs").glob("*/run.json")), key=lambda r: r["started"])
    assert statuses(rec) == {"a": "done", "b": "done", "c": "failed"}
    add_stage(chain, "c", "upstream = ['b']", "from mlnb import stage\nstage.save('out', {'y': stage.load('doubled')['x'] + 1})")
    # the fixed c makes what the first run's c made: without --force it would be reused from that run
    p = run_mlnb(chain, "run", "--resume", "--json", check=0)
    resumed = json.loads(p.stdout)
    assert resumed["run_id"] == rec["run_id"] and resumed["options"]["force"] is True
    assert statuses(resumed) == {"a": "done", "b": "done", "c": "done"}, "stages that ran before stay counted as ran"
    assert {n: s["in_attempt"] for n, s in resumed["stages"].items()} == {"a": 1, "b": 1, "c": 2}
    assert {n: s["attempt"] for n, s in resumed["stages"].items()} == {"a": 1, "b": 1, "c": 2}
    assert [(a["attempt"], a["status"], a["ran"]) for a in resumed["attempts"]] == [(1, "failed", ["a", "b", "c"]), (2, "done", ["c"])]
    assert "1 ran in this attempt, 2 before it, 0 reused" in p.stderr
    assert "in attempt 1 of this run" in p.stderr
    status = run_mlnb(chain, "status", check=0).stdout
    assert f"{rec['run_id']}  done" in status and "3 ran, 0 reused" in status


def test_resume_refuses_options_that_differ(chain):
    add_stage(chain, "c", "upstream = ['b']", "raise ValueError('not yet')")
    run_mlnb(chain, "run", "-p", "factor=3", check=1)
    p = run_mlnb(chain, "run", "--resume", "-p", "factor=4", check=1)
    assert error_lines(p.stderr) == [error_lines(p.stderr)[0]] and \
        "with the options it started with (-p factor=3); -p factor=4 is not one of them" in error_lines(p.stderr)[0]
