"The audit log's hash chain under tampering and concurrent writers, and `mlnb reproduce` of a deterministic run."
import json, sqlite3, subprocess, sys
from pathlib import Path
import pytest
from conftest import add_stage, git, run_json, run_mlnb

from mlnb import audit
from mlnb.config import load_config


def fill(project, n=10):
    cfg = load_config(project)
    for i in range(1, n + 1):
        audit.record(cfg, "test.event", {"version": i % 3}, {"i": i}, who=f"user{i % 2}")
    return audit.log_path(cfg)


def problems(project):
    return [(p["seq"], p["problem"]) for p in audit.verify(load_config(project))["problems"]]


def sql(path, *statements):
    con = sqlite3.connect(path)
    for s in statements: con.execute(s)
    con.commit(); con.close()


def test_intact_log_verifies_and_filters(project):
    fill(project)
    out = run_mlnb(project, "audit", "verify", check=0).stdout
    assert "10 events, chain intact" in out
    evs = run_json(project, "audit", "--kind", "test", "--ref", "version=1", "--actor", "user1")
    assert [e["data"]["i"] for e in evs] == [1, 7]
    assert len(run_json(project, "audit", "-n", "3")) == 3
    p = run_mlnb(project, "audit", "--ref", "version", check=2)
    assert "expected NAME=VALUE" in p.stderr


def test_edited_event_is_named(project):
    path = fill(project)
    sql(path, "UPDATE events SET data = '{\"i\":40}' WHERE seq = 4")
    assert problems(project) == [(4, "edited")]
    p = run_mlnb(project, "audit", "verify", check=1)
    assert "edited: event 4 (test.event by user0" in p.stdout and "was edited" in p.stdout
    assert p.stderr.startswith("mlnb: error: the audit log has been tampered with: event 4")


def test_edited_actor_with_a_recomputed_hash_breaks_the_next_link(project):
    path = fill(project)
    con = sqlite3.connect(path)
    seq, ts, who, kind, refs, data, prev = con.execute("SELECT seq, ts, actor, kind, refs, data, prev FROM events WHERE seq = 5").fetchone()
    forged = audit._hash(seq, ts, "someone-else", kind, refs, data, prev)  # the forger knows the hash function
    con.execute("UPDATE events SET actor = 'someone-else', hash = ? WHERE seq = 5", (forged,)); con.commit(); con.close()
    assert problems(project) == [(6, "broken link")]
    assert "event 6 (test.event) does not link to event 5" in run_mlnb(project, "audit", "verify", check=1).stdout


def test_reordered_events_are_named(project):
    path = fill(project)
    con = sqlite3.connect(path)
    rows = {r[0]: r[1:] for r in con.execute("SELECT pos, seq, ts, actor, kind, refs, data, prev, hash FROM events WHERE pos IN (3, 7)")}
    cols = "seq = ?, ts = ?, actor = ?, kind = ?, refs = ?, data = ?, prev = ?, hash = ?"
    con.execute(f"UPDATE events SET {cols} WHERE pos = 3", rows[7]); con.execute(f"UPDATE events SET {cols} WHERE pos = 7", rows[3])
    con.commit(); con.close()
    found = problems(project)
    assert (3, "moved") in found and all(kind == "moved" for _, kind in found), found
    assert "event 3 (test.event by user1" in run_mlnb(project, "audit", "verify", check=1).stdout


def test_deleted_events_are_named_in_the_middle_and_at_the_end(project):
    path = fill(project)
    sql(path, "DELETE FROM events WHERE seq = 6")
    assert problems(project) == [(6, "deleted")]
    assert "event 6 was deleted: the log goes from 5 to 7" in run_mlnb(project, "audit", "verify", check=1).stdout
    sql(path, "DELETE FROM events WHERE seq IN (9, 10)")
    assert problems(project) == [(6, "deleted"), (9, "deleted"), (10, "deleted")]
    assert "event 10 was deleted from the end of the log" in run_mlnb(project, "audit", "verify", check=1).stdout


WRITER = """
import sys
from mlnb import audit
w = int(sys.argv[2])
for i in range(500):
    audit.record(sys.argv[1], "load.test", {"writer": w}, {"i": i}, who=f"writer{w}")
"""


def test_eight_processes_append_500_events_each(tmp_path):
    path = tmp_path / "audit.db"
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(w)]) for w in range(8)]
    assert [p.wait(timeout=300) for p in procs] == [0] * 8
    rep = audit.verify(path)
    assert rep["ok"] and rep["events"] == 4000, rep["problems"][:5]
    evs = audit.events(path)
    assert [e["seq"] for e in evs] == list(range(1, 4001))
    for w in range(8):  # each writer's events are all there, in the order it wrote them
        assert [e["data"]["i"] for e in evs if e["refs"]["writer"] == str(w)] == list(range(500))


def deterministic_project(project):
    add_stage(project, "data", "upstream = []\nn = 400\nseed = 3",
              "import numpy as np, pandas as pd\nfrom mlnb import stage\nrng = np.random.default_rng(seed)\n"
              "X = rng.normal(size=(n, 3))\ndf = pd.DataFrame(X, columns=['a', 'b', 'c'])\ndf['y'] = (X @ [1.0, -2.0, 0.5] + rng.normal(size=n) > 0).astype(int)\n"
              "stage.save('table', df)\nstage.log_metric('rows', n)")
    add_stage(project, "fit", "upstream = ['data']\nC = 0.5",
              "from sklearn.linear_model import LogisticRegression\nfrom sklearn.preprocessing import StandardScaler\nfrom sklearn.pipeline import make_pipeline\n"
              "from mlnb import stage\ndf = stage.load('table')\nm = make_pipeline(StandardScaler(), LogisticRegression(C=C)).fit(df[['a', 'b', 'c']], df.y)\n"
              "stage.save('model', m)\nstage.log_metric('accuracy', m.score(df[['a', 'b', 'c']], df.y))")
    add_stage(project, "stamp", "upstream = ['fit']\ndeterministic = False",
              "import time\nfrom mlnb import stage\nstage.save('when', {'t': time.time()})")
    (project / ".gitignore").write_text(".mlnb/\n")
    git(project, "init", "-q"); git(project, "add", "-A"); git(project, "commit", "-qm", "a deterministic pipeline")


@pytest.mark.slow
def test_reproduce_a_deterministic_run(project):
    deterministic_project(project)
    rec = run_json(project, "run", "-p", "C=0.25")
    later = project / "pipeline" / "fit.ipynb"  # the code moves on after the run: reproduce uses the run's commit
    later.write_text(later.read_text().replace("C=C", "C=C * 2")); git(project, "commit", "-qam", "later change")
    rep = run_json(project, "reproduce", rec["run_id"], timeout=600)
    assert rep["matched"] and rep["source"]["commit"] == rec["git"]["commit"] and rep["data_digest"]["equal"]
    by = {s["stage"]: s for s in rep["stages"]}
    for name in ("data", "fit"):
        assert by[name]["equal"] and by[name]["key_equal"], by[name]
        assert all(x["equal"] for x in by[name]["products"] + by[name]["metrics"])
    assert by["fit"]["metrics"][0]["original"] == by["fit"]["metrics"][0]["reproduced"] and by["fit"]["products"][0]["name"] == "model"
    assert not by["stamp"]["equal"] and not by["stamp"]["deterministic"]  # reported, and expected
    text = run_mlnb(project, "reproduce", rec["run_id"], check=0).stdout
    assert "differs (expected: deterministic = False)" in text and "reproduced: every deterministic stage matched" in text
    # the reproduction ran in its own folder: the project's runs and cache are as they were
    assert rep["reproduction_run_id"] not in {r["run_id"] for r in run_json(project, "status")["runs"]}
    assert Path(rep["folder"], "project", ".mlnb", "runs", rep["reproduction_run_id"], "notebooks", "fit.ipynb").exists()
    kinds = [e["kind"] for e in run_json(project, "audit", "--ref", f"run={rec['run_id']}")]
    assert kinds.count("run.reproduced") == 2


def test_reproduce_names_a_stage_that_does_not_reproduce(project):
    add_stage(project, "noisy", "upstream = []", "import os\nfrom mlnb import stage\nstage.save('bytes', {'r': os.urandom(8).hex()})")
    (project / ".gitignore").write_text(".mlnb/\n")
    git(project, "init", "-q"); git(project, "add", "-A"); git(project, "commit", "-qm", "noisy")
    rec = run_json(project, "run")
    p = run_mlnb(project, "reproduce", rec["run_id"], timeout=600, check=1)
    verdict = p.stdout.splitlines()[-2]  # a source stage made other bytes: so did the data digest
    assert verdict.startswith("NOT reproduced: data digest ") and verdict.endswith("; stage noisy: product bytes")
    err = p.stderr.strip().splitlines()[-1]
    assert err.startswith(f"mlnb: error: run {rec['run_id']} was not reproduced: data digest") and err.endswith("stage noisy: product bytes")
    failed = run_mlnb(project, "reproduce", "nope", check=1)
    assert "no run 'nope'" in failed.stderr


def test_governance_commands_without_a_model_say_what_to_do(project):
    p = run_mlnb(project, "lineage", "champion", check=1)
    assert "cannot read model 'test-model'" in p.stderr and "registered by the pipeline's register stage: `mlnb run`" in p.stderr
    rep = run_json(project, "report")
    assert rep["metrics"]["deployments"]["count"] == 0 and rep["metrics"]["accuracy"] == []
    assert "accuracy: no model versions yet" in run_mlnb(project, "report", check=0).stdout


def test_text_view_shows_failures_at_a_glance(project):
    add_stage(project, "a", "upstream = []", "from mlnb import stage\nstage.save('x', {'n': 1})")
    add_stage(project, "boom", "upstream = ['a']", "raise ValueError('no rows for 2024-05-01\\nsecond line')")
    run_mlnb(project, "run", check=1)
    out = run_mlnb(project, "audit", check=0).stdout
    lines = out.splitlines()
    def line(*parts): return next(x for x in lines if all(p in x for p in parts))
    failed = line("stage.finished", "stage=boom")
    assert " FAILED " in failed and failed.endswith("ValueError: no rows for 2024-05-01"), failed  # the error's first line
    assert " done " in line("stage.finished", "stage=a") and "FAILED" not in line("stage.finished", "stage=a")
    assert " FAILED " in line("run.finished") and line("run.finished").endswith("stage boom failed")
    assert "\x1b[" not in out  # plain text when not a terminal
    colored = run_mlnb(project, "audit", env={"FORCE_COLOR": "1", "TERM": "xterm-256color"}, check=0).stdout.splitlines()
    red = [x for x in colored if "\x1b[31m" in x]
    assert len(red) == 2 and all("FAILED" in x for x in red), colored
    assert run_json(project, "audit", "--kind", "run.finished")[0]["data"]["status"] == "failed"  # --json: the events as they are
