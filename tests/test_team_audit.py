"One audit trail for the team: the audit log in PostgreSQL, written by many processes at once, its head anchored on the MLflow server."
import subprocess, sys, uuid
import pytest
from conftest import add_stage, free_port, run_mlnb

from mlnb import audit, tracking
from mlnb.config import load_config

pytestmark = pytest.mark.slow


@pytest.fixture
def team(team_stack, project, monkeypatch):
    "A project whose audit log is a fresh PostgreSQL database and whose tracking store is the stack's MLflow server (own experiment)."
    url = team_stack.pg.create_database(f"audit_{uuid.uuid4().hex[:10]}")
    env = {"MLNB_AUDIT_LOG": url, "MLNB_TRACKING_URI": team_stack.mlflow_uri, "MLNB_EXPERIMENT": f"audit-{uuid.uuid4().hex[:8]}"}
    for k, v in env.items(): monkeypatch.setenv(k, v)  # for this process's load_config, and inherited by the processes it starts
    return project, url, env

def sql(url, *statements):
    import psycopg
    with psycopg.connect(url, autocommit=True) as con:
        for s in statements: con.execute(*s) if isinstance(s, tuple) else con.execute(s)


def rechain(url, change):
    "What a forger with write access to the database does: change events, recompute every hash after them, move the head row."
    import psycopg
    with psycopg.connect(url) as con:
        prev = audit.GENESIS
        for pos, seq, ts, who, kind, refs, data in con.execute("SELECT pos, seq, ts, actor, kind, refs, data FROM mlnb_audit_events ORDER BY seq").fetchall():
            who = change(seq, who)
            h = audit._hash(seq, ts, who, kind, refs, data, prev)
            con.execute("UPDATE mlnb_audit_events SET actor = %s, prev = %s, hash = %s WHERE pos = %s", (who, prev, h, pos)); prev = h
        con.execute("UPDATE mlnb_audit_head SET hash = %s", (prev,))


WRITER = """
import sys
from mlnb import audit, tracking
from mlnb.config import load_config
project, w, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
cfg = load_config(project)
for i in range(n):
    audit.record(cfg, "load.test", {"writer": w}, {"i": i}, who=f"writer{w}")
tracking.anchor_audit_head(cfg)  # what every mlnb command does when it ends: eight anchors race for the tag
"""


def test_eight_processes_append_at_once_and_verify_counts_every_event(team):
    project, url, env = team
    n = 150
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(project), str(w), str(n)]) for w in range(8)]
    assert [p.wait(timeout=300) for p in procs] == [0] * 8
    out = run_mlnb(project, "audit", "verify", check=0).stdout
    assert f"{8 * n} events, chain intact" in out, out
    assert f"head: event {8 * n} anchored in tag mlnb.audit_head of experiment '{env['MLNB_EXPERIMENT']}'" in out, out  # verify anchors what it checked
    evs = audit.events(url)
    assert [e["seq"] for e in evs] == list(range(1, 8 * n + 1))  # one chain: no fork, no gap, nothing lost
    for w in range(8):  # each writer's events are all there, in the order it wrote them
        assert [e["data"]["i"] for e in evs if e["refs"]["writer"] == str(w)] == list(range(n))
    assert tracking.read_audit_anchor(load_config(project))["seq"] == 8 * n


def test_an_edited_row_is_named(team):
    project, url, _ = team
    for i in range(10): audit.record(url, "test.event", {"n": i}, {"i": i}, who="tester")
    sql(url, "UPDATE mlnb_audit_events SET data = '{\"i\":40}' WHERE seq = 4")
    p = run_mlnb(project, "audit", "verify", check=1)
    assert "10 events, 1 problem(s):" in p.stdout and "edited: event 4 (test.event by tester" in p.stdout, p.stdout
    assert p.stderr.startswith("mlnb: error: the audit log has been tampered with: event 4") and len(p.stderr.strip().splitlines()) == 1
    sql(url, "DELETE FROM mlnb_audit_events WHERE seq = 10")  # the last event: the head row still counts it
    assert "event 10 was deleted from the end of the log" in run_mlnb(project, "audit", "verify", check=1).stdout


def test_a_rewritten_and_rechained_log_is_caught_by_its_anchor(team, team_stack):
    project, url, env = team
    add_stage(project, "a", "upstream = []", "from mlnb import stage\nstage.save('x', {'n': 1})")
    secret = url.replace("postgresql://mlnb@", "postgresql://mlnb:s3cret-pw@")  # trust auth on loopback ignores it; a record must not keep it
    assert secret != url
    run_mlnb(project, "run", env={"MLNB_AUDIT_LOG": secret}, check=0)  # appends run.started, stage.finished, run.finished; anchors the last
    import json
    rec = json.loads(next((project / ".mlnb/runs").glob("*/run.json")).read_text())
    assert rec["settings"]["audit_log"] == secret.replace(":s3cret-pw@", ":***@") and "s3cret-pw" not in json.dumps(rec)
    cfg = load_config(project)
    last = audit.events(url)[-1]
    assert last["kind"] == "run.finished"
    assert {k: v for k, v in tracking.read_audit_anchor(cfg).items() if k != "where"} == {"seq": last["seq"], "hash": last["hash"]}
    assert "chain intact" in run_mlnb(project, "audit", "verify", check=0).stdout

    rechain(url, lambda seq, who: "mallory" if seq == 1 else who)  # a consistent chain, head row included
    unanchored = run_mlnb(project, "audit", "verify", env={"MLNB_TRACKING_URI": f"sqlite:///{project}/.mlnb/mlflow.db"}, check=0).stdout
    assert "chain intact" in unanchored and "head: not anchored outside the database" in unanchored  # the database alone cannot tell
    p = run_mlnb(project, "audit", "verify", check=1)
    assert f"rewritten: event {last['seq']} differs from the head anchored in tag mlnb.audit_head of experiment '{env['MLNB_EXPERIMENT']}'" in p.stdout, p.stdout
    assert len(p.stderr.strip().splitlines()) == 1 and "the log and its head record were rewritten" in p.stderr

    sql(url, ("DELETE FROM mlnb_audit_events WHERE seq = %s", (last["seq"],)))  # and cut short, the head row moved back with it
    rechain(url, lambda seq, who: who)
    sql(url, ("UPDATE mlnb_audit_head SET seq = %s", (last["seq"] - 1,)))
    p = run_mlnb(project, "audit", "verify", check=1)
    assert (f"deleted: the log ends at event {last['seq'] - 1} but its head anchored in tag mlnb.audit_head of experiment "
            f"'{env['MLNB_EXPERIMENT']}' on {team_stack.mlflow_uri} is event {last['seq']}") in p.stdout, p.stdout


def test_an_unreachable_database_is_one_line_without_the_password(project):
    url = f"postgresql://mlnb:s3cret@127.0.0.1:{free_port()}/audit"
    for args in (["audit", "verify"], ["audit"], ["run"]):
        p = run_mlnb(project, *args, env={"MLNB_AUDIT_LOG": url}, check=1)
        assert p.stderr.startswith(f"mlnb: error: cannot reach the audit log postgresql://mlnb:***@{url.split('@')[1]}: connection failed: "), p.stderr
        assert "audit_log in settings.ini [mlnb] (or MLNB_AUDIT_LOG) accepts a SQLite file" in p.stderr
        assert len(p.stderr.strip().splitlines()) == 1 and "s3cret" not in p.stderr + p.stdout
    p = run_mlnb(project, "audit", env={"MLNB_AUDIT_LOG": "mysql://mlnb:s3cret@127.0.0.1/audit"}, check=1)
    assert p.stderr.strip() == ("mlnb: error: audit_log = 'mysql://mlnb:***@127.0.0.1/audit' is not supported; accepted: a SQLite file "
                                "(default .mlnb/audit.db) or a PostgreSQL URL postgresql://USER@HOST:PORT/DATABASE (its password in "
                                "~/.pgpass or PGPASSWORD rather than in the URL)")
