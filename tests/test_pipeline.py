"The pipeline engine through the real CLI: cache keys, selection, failure and resume, parallelism, timeouts."
import json, os, signal, subprocess, time
import pytest
from pathlib import Path
from conftest import MLNB, add_stage, run_json, run_mlnb, statuses


def product(project, rec, stage, name):
    entry = Path(rec["stages"][stage]["entry"])
    return json.loads((entry / f"{name}.json").read_text())


def edit_cell(nb_path, index, new_source=None, **changes):
    nb = json.loads(Path(nb_path).read_text())
    cell = nb["cells"][index]
    if new_source is not None: cell["source"] = new_source
    cell.update(changes)
    Path(nb_path).write_text(json.dumps(nb, indent=1))


def test_a_runs_process_leaves_out_papermills_hdfs_handler_and_pyarrow(chain):
    """papermill's handler of hdfs:// paths imports pyarrow.fs (a third of papermill's import, in every run that executes a
    stage); a run's process leaves it out, and pyarrow.fs still imports afterwards for whoever asks."""
    import sys
    script = ("import sys; from mlnb.cli import main\n"
              "try: main(sys.argv[1:])\n"
              "except SystemExit as e: assert not e.code, e.code\n"
              "assert 'papermill' in sys.modules and 'pyarrow' not in sys.modules, 'imported pyarrow'\n"
              "import pyarrow.fs, papermill.iorw\n"
              "print(papermill.iorw.HadoopFileSystem.__name__, pyarrow.fs.LocalFileSystem.__name__)")
    p = subprocess.run([sys.executable, "-c", script, "--project", str(chain), "run", "--force"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.split()[-2:] == ["missing_dep", "LocalFileSystem"], p.stdout


def test_cold_then_fully_reused(chain):
    first = run_json(chain, "run")
    assert statuses(first) == {"a": "done", "b": "done", "c": "done"}
    assert product(chain, first, "c", "out") == {"y": 7}
    assert all((chain / ".mlnb/runs" / first["run_id"] / "notebooks" / f"{s}.ipynb").exists() for s in "abc")
    second = run_json(chain, "run")
    assert statuses(second) == {"a": "cached", "b": "cached", "c": "cached"}
    assert second["run_id"] != first["run_id"]
    # a reused stage still has its executed notebook in the new run folder (the audit record of what ran)
    nb = json.loads((chain / ".mlnb/runs" / second["run_id"] / "notebooks" / "b.ipynb").read_text())
    assert any("injected-parameters" in c["metadata"].get("tags", []) for c in nb["cells"])


@pytest.mark.slow
def test_code_edit_reruns_stage_and_downstream_only(chain):
    run_json(chain, "run")
    edit_cell(chain / "pipeline/b.ipynb", 1, "from mlnb import stage\nx = stage.load('nums')['n'] * factor * 10\nstage.save('doubled', {'x': x})")
    rec = run_json(chain, "run")
    assert statuses(rec) == {"a": "cached", "b": "done", "c": "done"}
    assert product(chain, rec, "c", "out") == {"y": 61}


def test_markdown_outputs_and_metadata_edits_rerun_nothing(chain):
    add_stage(chain, "b", "upstream = ['a']\nfactor = 2",
              "from mlnb import stage\nx = stage.load('nums')['n'] * factor\nstage.save('doubled', {'x': x})", markdown="# B")
    run_json(chain, "run")
    nb_path = chain / "pipeline/b.ipynb"
    edit_cell(nb_path, 0, "# B, now with a longer explanation")
    edit_cell(nb_path, 2, outputs=[{"output_type": "stream", "name": "stdout", "text": "stale output\n"}], execution_count=12,
              metadata={"tags": [], "collapsed": True})
    nb = json.loads(nb_path.read_text()); nb["metadata"]["authors"] = ["someone"]; nb_path.write_text(json.dumps(nb))
    assert statuses(run_json(chain, "run")) == {"a": "cached", "b": "cached", "c": "cached"}


def test_param_rekeys_only_the_stages_it_reaches(chain):
    run_json(chain, "run")
    rec = run_json(chain, "run", "-p", "factor=5")
    assert statuses(rec) == {"a": "cached", "b": "done", "c": "done"}
    assert product(chain, rec, "c", "out") == {"y": 16}
    assert rec["params"]["b"] == {"factor": 5}
    # the same override again is a full cache hit; a stage-qualified one reaches only that stage
    assert statuses(run_json(chain, "run", "-p", "b.factor=5")) == {"a": "cached", "b": "cached", "c": "cached"}


def test_gc_removes_what_no_kept_run_uses_and_runs_go_on(chain):
    "The cache only grew: `mlnb gc` removes entries no kept run, registered champion or stage's latest uses, and runs reuse or remake the rest."
    from mlnb import audit
    from mlnb.config import load_config
    r1 = run_json(chain, "run")
    a = Path(r1["stages"]["a"]["entry"])
    (a / "nums.json").write_text('{"n": 4}')  # changed on disk: the next run refuses the entry, sets it aside and runs a again
    r2 = run_json(chain, "run")
    refused = list(a.parent.glob(".refused-*"))
    assert statuses(r2) == {"a": "done", "b": "cached", "c": "cached"} and len(refused) == 1 and r2["run_id"] in refused[0].name
    r3 = run_json(chain, "run", "-p", "factor=3")
    name = lambda rec, s: Path(rec["stages"][s]["entry"]).name
    want = {("b", name(r1, "b")), ("c", name(r1, "c")), ("a", refused[0].name)}  # r2 reused r1's b and c; its refused a goes with it
    dry = run_json(chain, "gc", "--keep-runs", "1", "--dry-run")
    assert {(r["stage"], r["entry"]) for r in dry["removed"]} == want and dry["runs_kept"] == {r3["run_id"]: "the newest run"}
    assert all((chain / ".mlnb/cache" / s / e).exists() for s, e in want), "a dry run removes nothing"
    p = run_mlnb(chain, "gc", "--keep-runs", "1", check=0)
    assert p.stdout.startswith("gc: removed 2 cache entries (") and "1 refused" in p.stdout and "kept 3 (" in p.stdout, p.stdout
    assert not any((chain / ".mlnb/cache" / s / e).exists() for s, e in want)
    assert {e.name for e in (chain / ".mlnb/cache").glob("*/*")} == {name(r3, s) for s in "abc"}
    ev = [e for e in audit.events(load_config(chain)) if e["kind"] == "cache.gc"]
    assert len(ev) == 1 and ev[0]["data"]["removed"] == 3 and ev[0]["data"]["keep_runs"] == 1
    again = run_json(chain, "run")  # what was removed is made again; what was kept is reused
    assert statuses(again) == {"a": "cached", "b": "done", "c": "done"} and again["status"] == "done"
    assert statuses(run_json(chain, "run", "-p", "factor=3")) == {"a": "cached", "b": "cached", "c": "cached"}
    assert run_mlnb(chain, "gc", "--keep-runs", "-1", check=2).stderr.rstrip().endswith("-1 is not in the range x>=0.")


def test_rerun_with_same_product_bytes_does_not_invalidate_downstream(project):
    add_stage(project, "a", "upstream = []\nn = 3", "from mlnb import stage\nstage.save('nums', {'parity': n % 2})")
    add_stage(project, "b", "upstream = ['a']", "from mlnb import stage\nstage.save('p', stage.load('nums'))")
    run_json(project, "run")
    rec = run_json(project, "run", "-p", "n=5")  # a reruns but writes the same bytes
    assert statuses(rec) == {"a": "done", "b": "cached"}


@pytest.mark.slow
def test_only_from_and_force(chain):
    run_json(chain, "run")
    assert statuses(run_json(chain, "run", "--only", "b")) == {"a": "cached", "b": "done", "c": "not run"}
    assert statuses(run_json(chain, "run", "--from", "b")) == {"a": "cached", "b": "done", "c": "done"}
    assert statuses(run_json(chain, "run", "--force")) == {"a": "done", "b": "done", "c": "done"}


def test_only_without_upstream_products_says_what_to_do(chain):
    p = run_mlnb(chain, "run", "--only", "c", check=1)
    assert "stage 'a' has no products to reuse; run it first" in p.stderr


@pytest.mark.slow
def test_failing_stage_then_resume(chain):
    add_stage(chain, "b", "upstream = ['a']\nfactor = 2", "from mlnb import stage\nx = 1", "raise ValueError('factor is wrong')")
    p = run_mlnb(chain, "run", check=1)
    lines = [l for l in p.stderr.splitlines() if l.startswith("mlnb: error")]
    assert len(lines) == 1, p.stderr
    # the cell as its author counts it (the parameters cell is code cell 1; papermill's injected cell is not counted)
    assert "stage 'b' failed in code cell 3 of b.ipynb, line 1 (the cell starting `raise ValueError('factor is wrong')`): ValueError: factor is wrong" in lines[0]
    printed = lines[0].split("executed notebook: ")[1].rstrip(")")
    assert not Path(printed).is_absolute() and printed.startswith("runs/"), "relative to the project, outside the hidden .mlnb"
    from jupyter_server.services.contents.filemanager import FileContentsManager
    nb = FileContentsManager(root_dir=str(chain)).get(printed, content=True)["content"]  # what JupyterLab opens
    errs = [c for c in nb["cells"] if any(o.get("output_type") == "error" for o in c.get("outputs", []))]
    assert errs and errs[0]["outputs"][-1]["ename"] == "ValueError" and errs[0]["source"].startswith("raise ValueError")
    assert any("papermill-error-cell-tag" in c["metadata"].get("tags", []) for c in nb["cells"]), "failing cell is marked"
    rec = json.loads(next((chain / ".mlnb/runs").glob("*/run.json")).read_text())
    assert rec["stages"]["b"]["visible_notebook"] == printed and rec["stages"]["b"]["cell"] == 4
    assert (chain / printed).samefile(rec["stages"]["b"]["notebook"])
    assert statuses(rec) == {"a": "done", "b": "failed", "c": "skipped"}
    assert rec["status"] == "failed"
    # fix the notebook and resume the same run: a is reused, b and c run, the run folder is the same
    add_stage(chain, "b", "upstream = ['a']\nfactor = 2", "from mlnb import stage\nstage.save('doubled', {'x': stage.load('nums')['n'] * factor})")
    said = run_mlnb(chain, "run", "--resume", "--json", check=0)
    resumed = json.loads(said.stdout)
    assert resumed["run_id"] == rec["run_id"] and resumed["resumed"]
    assert f"resuming run {rec['run_id']}, which failed (attempt 2): 1 stage it finished before (a) are kept" in said.stderr, said.stderr
    assert 0 < resumed["duration"] < resumed["ended"] - resumed["started"], "the attempts' time, not the pause between them"
    assert statuses(resumed) == {"a": "done", "b": "done", "c": "done"}, "a ran in the first attempt and stays counted as ran"
    assert {n: s["in_attempt"] for n, s in resumed["stages"].items()} == {"a": 1, "b": 2, "c": 2}
    assert product(chain, resumed, "c", "out") == {"y": 7}


def test_resume_without_failed_run_is_a_clear_error(chain):
    p = run_mlnb(chain, "run", "--resume", check=1)
    assert "no failed or interrupted run to resume" in p.stderr
    # a failed run, then one that finished: --resume does not go back to the old failure, and says how to
    add_stage(chain, "c", "upstream = ['b']", "raise ValueError('not yet')")
    run_mlnb(chain, "run", check=1)
    failed = run_json(chain, "status")["run"]
    assert failed["status"] == "failed"
    add_stage(chain, "c", "upstream = ['b']", "from mlnb import stage\nstage.save('out', {'y': stage.load('doubled')['x'] + 1})")
    done = run_json(chain, "run")
    p = run_mlnb(chain, "run", "--resume", check=1)
    assert p.stderr.strip() == (f"mlnb: error: the newest run, {done['run_id']}, finished, so there is no last failed run to resume; run "
                                f"{failed['run_id']} failed before it: `mlnb run --resume {failed['run_id']}` continues that one"), p.stderr


@pytest.mark.slow
def test_ctrl_c_leaves_a_resumable_run(project):
    add_stage(project, "a", "upstream = []", "from mlnb import stage\nstage.save('v', {'v': 1})")
    add_stage(project, "slow", "upstream = ['a']\nseconds = 60", "import time\ntime.sleep(seconds)", "from mlnb import stage\nstage.save('done', {'ok': True})")
    proc = subprocess.Popen([*MLNB, "--project", str(project), "run"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        recs = list((project / ".mlnb/runs").glob("*/run.json"))
        if recs and json.loads(recs[0].read_text())["stages"]["slow"]["status"] == "running": break
        time.sleep(0.2)
    time.sleep(1.5)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "--resume" in err
    rec = json.loads(recs[0].read_text())
    assert rec["status"] == "interrupted" and rec["stages"]["slow"]["status"] == "interrupted"
    assert not list((project / ".mlnb/cache/slow").glob("*")) or not any(
        (p / "manifest.json").exists() for p in (project / ".mlnb/cache/slow").iterdir()), "no half product left to reuse"
    assert (project / ".mlnb/runs" / rec["run_id"] / "notebooks/slow.ipynb").exists(), "the interrupted stage's notebook is kept"
    assert (project / "runs" / rec["run_id"] / "slow.ipynb").samefile(project / ".mlnb/runs" / rec["run_id"] / "notebooks/slow.ipynb")
    add_stage(project, "slow", "upstream = ['a']\nseconds = 0", "import time\ntime.sleep(seconds)", "from mlnb import stage\nstage.save('done', {'ok': True})")
    resumed = run_json(project, "run", "--resume", rec["run_id"])
    assert resumed["run_id"] == rec["run_id"]
    assert statuses(resumed) == {"a": "done", "slow": "done"}


def test_independent_stages_run_in_parallel(project):
    add_stage(project, "root", "upstream = []", "from mlnb import stage\nstage.save('r', {'r': 1})")
    for name in ("left", "right"):
        add_stage(project, name, f"upstream = ['root']\nname = '{name}'",
                  "import time\nfrom mlnb import stage\nt0 = time.time()\ntime.sleep(6)\nstage.save('span', {'start': t0, 'end': time.time()})")
    rec = run_json(project, "run", "--jobs", "2")
    spans = [json.loads((Path(rec["stages"][n]["entry"]) / "span.json").read_text()) for n in ("left", "right")]
    overlap = min(s["end"] for s in spans) - max(s["start"] for s in spans)
    assert overlap > 3.0, f"left and right overlapped only {overlap:.2f}s with --jobs 2"


def test_a_stage_queued_behind_the_pool_still_runs(project):
    "jobs = 1 and two last stages ready at once: the second waits for the first, then runs (it used to be left `not run` in a run called done)."
    add_stage(project, "root", "upstream = []", "from mlnb import stage\nstage.save('r', {'r': 1})")
    for name in ("left", "right"): add_stage(project, name, "upstream = ['root']", f"from mlnb import stage\nstage.save('{name}', {{'x': 1}})")
    assert statuses(run_json(project, "run")) == {"root": "done", "left": "done", "right": "done"}


@pytest.mark.slow
def test_stage_timeout(project):
    add_stage(project, "sleepy", "upstream = []", "import time\ntime.sleep(120)")
    t0 = time.time()
    p = run_mlnb(project, "run", "--timeout", "3", check=1)
    assert time.time() - t0 < 60
    assert "stage 'sleepy' failed" in p.stderr and "timeout of 3 s" in p.stderr


@pytest.mark.slow
def test_two_runs_at_once_do_not_corrupt_each_other(chain):
    procs = [subprocess.Popen([*MLNB, "--project", str(chain), "run", "--json", "--wait-tracking"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    recs = [json.loads(o[0]) for o in outs]
    assert recs[0]["run_id"] != recs[1]["run_id"]
    for r in recs: assert json.loads((Path(r["stages"]["c"]["entry"]) / "out.json").read_text()) == {"y": 7}
    # the cache holds exactly one finished entry per stage, and a third run reuses everything
    for s in "abc":
        entries = [p for p in (chain / ".mlnb/cache" / s).iterdir()]
        assert len(entries) == 1 and (entries[0] / "manifest.json").exists(), entries
    assert statuses(run_json(chain, "run")) == {"a": "cached", "b": "cached", "c": "cached"}


@pytest.mark.slow
def test_stage_notebook_runs_unchanged_outside_a_pipeline(chain):
    "What JupyterLab does: run the notebook with its defaults and no injected context; it reads the products of the last finished run."
    first = run_json(chain, "run")
    # a later run that failed (a rejected retrain) made other products of a and b: a notebook run by hand does not pick them up
    add_stage(chain, "c", "upstream = ['b']", "raise RuntimeError('rejected')")
    run_mlnb(chain, "run", "-p", "n=5", check=1)
    import papermill as pm
    out = chain / "b-interactive.ipynb"
    env_before = os.environ.get("MLNB_PROJECT")
    pm.execute_notebook(str(chain / "pipeline/b.ipynb"), str(out), cwd=str(chain / "pipeline"), progress_bar=False, kernel_name="python3")
    scratch = chain / ".mlnb/scratch/interactive/doubled.json"
    assert json.loads(scratch.read_text()) == {"x": 6}
    said = "".join("".join(o.get("data", {}).get("text/plain", "")) for c in json.loads(out.read_text())["cells"] for o in c.get("outputs", []))
    assert f"mlnb: upstream 'a': the products of run {first['run_id']} (the newest finished run that has them)" in said
    assert os.environ.get("MLNB_PROJECT") == env_before


# --- stages that start warm (issue 12) ------------------------------------------------------------------------------

PROBE = '''"Records, when first imported, what the kernel importing it looks like then, in a file named after its process."
import json, os, sys
from pathlib import Path
from IPython import get_ipython
SEEN = {"cells": len(get_ipython().user_ns.get("In", [""])) - 1, "pid": os.getpid(), "pandas": "pandas" in sys.modules,
        "ctx_probe": "mlnb_probe_ctx" in sys.modules, "env": sorted(os.environ.items())}
Path(os.environ["PROBE_OUT"], f"probe-{os.getpid()}.json").write_text(json.dumps(SEEN))
'''
PROBE_CTX = "from mlnb import stage\nOUT = stage.context()['out_dir']  # read at import: the stage's own context, or its warm-up's placeholder\n"
WARM_IMPORTS = "import os, sys\nimport pandas\nimport mlnb_probe\nfrom mlnb import stage\nimport mlnb_probe_ctx"
WARM_SEEN = ("seen = {'names': sorted(dir()), 'count': get_ipython().execution_count, 'In': len(In), 'path': sys.path, 'pid': os.getpid(),\n"
             "        'argv': sys.argv[:2] + sys.argv[3:],\n"  # all but the connection file
             "        'env': sorted(os.environ.items()), 'probe': mlnb_probe.SEEN, 'ctx_out': mlnb_probe_ctx.OUT}")


@pytest.fixture(scope="module")
def warmed(tmp_path_factory):
    "A run of two stages whose imports include installed modules with import-time side effects (a tiny site folder on PYTHONPATH)."
    d = tmp_path_factory.mktemp("warm")
    site, probes = d / "site", d / "probes"
    site.mkdir(); probes.mkdir()
    for name, src in (("mlnb_probe", PROBE), ("mlnb_probe_ctx", PROBE_CTX)):  # installed: a distribution of their own
        (site / f"{name}.py").write_text(src)
        (site / f"{name}-0.1.dist-info").mkdir()
        (site / f"{name}-0.1.dist-info/METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    project = d / "project"; (project / "pipeline").mkdir(parents=True)
    (project / "settings.ini").write_text("[mlnb]\npipeline = pipeline\nexperiment = test\njobs = 1\nprestart = 2\n")
    add_stage(project, "warm", "upstream = []\nx = 1", WARM_IMPORTS, WARM_SEEN, "saved = stage.save('seen', seen)")
    add_stage(project, "plain", "upstream = ['warm']", "import mlnb_probe\nfrom mlnb import stage", "saved = stage.save('seen', {'probe': mlnb_probe.SEEN})")
    env = {"PYTHONPATH": str(site), "PROBE_OUT": str(probes)}
    rec = run_json(project, "run", env=env)
    return project, rec, env


def test_the_warm_up_is_invisible_and_sees_the_stage_environment(warmed, tmp_path, monkeypatch):
    "Nothing of the warm-up shows in the stage (names, outputs, execution counts); an import with side effects saw the stage's environment."
    project, rec, env = warmed
    seen = product(project, rec, "warm", "seen")
    probe = seen["probe"]
    assert probe["cells"] == 0 and probe["pid"] == seen["pid"], "imported in the stage's own kernel, before its first cell"
    assert probe["env"] == seen["env"], "the environment the import saw is the one the stage's cells see"
    assert dict(seen["env"])["MLNB_PROJECT"] == str(project) and dict(seen["env"])["PROBE_OUT"] == env["PROBE_OUT"]
    assert json.loads((Path(env["PROBE_OUT"]) / f"probe-{seen['pid']}.json").read_text()) == probe
    # a module that reads the stage's context at import could not in the warm-up: the stage imported it, with its own context
    out = Path(seen["ctx_out"])
    assert out.parent == project / ".mlnb/cache/warm" and out.name.startswith(".tmp-"), out
    assert not (project / ".mlnb/scratch").exists(), "no interactive context was ever made"
    # the same notebook run by bare papermill in a fresh kernel (no warm-up): the same namespace, counts and outputs
    import papermill as pm
    monkeypatch.setenv("PYTHONPATH", env["PYTHONPATH"]); monkeypatch.setenv("PROBE_OUT", str(tmp_path))
    pm.execute_notebook(str(project / "pipeline/warm.ipynb"), str(tmp_path / "bare.ipynb"), progress_bar=False, kernel_name="python3",
                        parameters={"x": 1, "mlnb_context": {"out_dir": str(tmp_path / "out"), "upstream": {}}}, cwd=str(project / "pipeline"))
    bare = json.loads((tmp_path / "out/seen.json").read_text())
    assert bare["probe"]["cells"] == 3, "there the probe was imported by the stage's own cell (In [3])"
    for k in ("names", "count", "In", "path", "argv"): assert seen[k] == bare[k], k
    cells = lambda nb: [(c.get("execution_count"), c.get("outputs")) for c in json.loads(Path(nb).read_text())["cells"]]
    assert cells(rec["stages"]["warm"]["notebook"]) == cells(tmp_path / "bare.ipynb") == [(1, []), (2, []), (3, []), (4, []), (5, [])]


LOOK_AT_PARENT = ("import os\nparent = os.getppid()\n"
                  "seen = {'zygote': b'ipykernel_launcher' in open(f'/proc/{parent}/cmdline', 'rb').read(),\n"
                  "        'sklearn_in_zygote': '/sklearn/' in open(f'/proc/{parent}/maps').read()}\n"
                  "stage.save('seen', seen)")


def test_a_stages_numerical_imports_are_made_once_in_the_zygote_its_kernel_is_forked_from(project):
    """The run's zygote makes the heavy imports a stage starts with (scikit-learn here) before it forks the stage's kernel, so
    the kernels forked after it share them instead of each importing them again: scikit-learn's compiled modules are mapped
    in the zygote, the kernel's parent. A run whose stages do not import it leaves it out of the zygote."""
    add_stage(project, "plain", "upstream = []", "from mlnb import stage", LOOK_AT_PARENT)
    rec = run_json(project, "run")
    assert product(project, rec, "plain", "seen") == {"zygote": True, "sklearn_in_zygote": False}
    add_stage(project, "fit", "upstream = ['plain']", "import sklearn.linear_model\nfrom mlnb import stage", LOOK_AT_PARENT)
    rec = run_json(project, "run")
    assert statuses(rec) == {"plain": "cached", "fit": "done"}
    assert product(project, rec, "fit", "seen") == {"zygote": True, "sklearn_in_zygote": True}


def test_the_libraries_of_the_mlnb_functions_a_stage_calls_are_imported_once_in_the_zygote(project):
    """`steps.evaluate` imports matplotlib inside, when it runs. A stage whose code calls it (read from its cells, not run:
    this one never makes the call) starts in a kernel forked from a zygote that imported matplotlib first, so matplotlib's
    compiled modules are mapped in the kernel's parent; a stage that calls nothing that needs it leaves it out. Every
    kernel's collector leaves alone the objects it inherits from the zygote (frozen there before the fork)."""
    look = ("import gc, os\nparent = os.getppid()\n"
            "seen = {'matplotlib_in_zygote': '/matplotlib/' in open(f'/proc/{parent}/maps').read(), 'frozen': gc.get_freeze_count() > 1000}\n"
            "stage.save('seen', seen)")
    add_stage(project, "plain", "upstream = []", "from mlnb import stage, steps", look)
    rec = run_json(project, "run")
    assert product(project, rec, "plain", "seen") == {"matplotlib_in_zygote": False, "frozen": True}
    add_stage(project, "report", "upstream = ['plain']", "from mlnb import stage, steps", look,
              "if not seen: steps.evaluate(stage.load('model'), stage.load('holdout'))")
    rec = run_json(project, "run")
    assert statuses(rec) == {"plain": "cached", "report": "done"}
    assert product(project, rec, "report", "seen") == {"matplotlib_in_zygote": True, "frozen": True}


def test_a_warmed_module_is_imported_before_the_stage_starts(warmed):
    """pandas, which the stage imports first thing, is in sys.modules before its first cell runs; a kernel's warm-up makes its
    own stage's imports only (the numerical libraries another stage imports may be there already: imported once, in the
    zygote the kernels are forked from, for a kernel forked before this one)."""
    project, rec, _ = warmed
    probe = product(project, rec, "warm", "seen")["probe"]
    assert probe["cells"] == 0 and probe["pandas"] is True, "imported after pandas, before any cell: pandas was there before the first cell"
    assert probe["ctx_probe"] is False, "imported in the order the stage imports them"
    other = product(project, rec, "plain", "seen")["probe"]
    assert other["cells"] == 0 and other["ctx_probe"] is False, "the other stage's own module is not in this kernel"


def test_a_kernel_ends_when_the_zygote_it_was_forked_from_is_killed(project):
    """A stage's kernel is forked from the run's zygote, its parent. When the zygote is killed (`kill -9`, or with the Dask
    worker it belongs to) the kernel ends within seconds instead of living on, orphaned, and the run says the stage failed."""
    from conftest import wait_for
    probe = project / "kernel.pids"
    add_stage(project, "slow", "upstream = []", "import os, time\nfrom pathlib import Path",
              f"Path({str(probe)!r}).write_text(f'{{os.getpid()}} {{os.getppid()}}')\ntime.sleep(300)")
    p = subprocess.Popen([*MLNB, "--project", str(project), "run"], cwd=project, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, start_new_session=True)
    try:
        kernel, zygote = map(int, wait_for(lambda: probe.exists() and probe.read_text(), timeout=120, what="the stage's kernel").split())
        assert zygote != p.pid, "the kernel was forked from the zygote, not started by the engine"
        os.kill(zygote, signal.SIGKILL)
        alive = lambda pid: Path(f"/proc/{pid}").exists() and Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        wait_for(lambda: not alive(kernel), timeout=15, what="the orphaned kernel's end")
        out, err = p.communicate(timeout=120)
        assert p.returncode == 1 and "slow" in err, err
    finally:
        if p.poll() is None: os.killpg(p.pid, signal.SIGKILL)
