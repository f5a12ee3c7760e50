"""What the audit log's tamper evidence costs: appends (one writer, and eight processes at once) and `verify`.

Baselines, measured in the same run:
  plain   the cheapest durable append that is safe with concurrent writers: one INSERT per transaction into a
          SQLite table in WAL mode (same pragmas, one connection per process, as mlnb), no hash chain, no head file
  jsonl   one JSON line appended under an exclusive flock (what a hand-rolled log would do)
Ratios are mlnb / baseline (time per event): 1.0 means the chain costs nothing.
With `--postgres URL` (an empty database of a running PostgreSQL, e.g. postgresql://USER@127.0.0.1:5432/bench) it also
measures mlnb on PostgreSQL (`audit_log = postgresql://...`: one transaction per append, serialized on the head row),
as a ratio to mlnb on SQLite; its tables are dropped before each run.
"""
import argparse, json, os, sqlite3, statistics, subprocess, sys, tempfile, time
from pathlib import Path

HERE = Path(__file__).resolve().parent

WRITER = r"""
import fcntl, json, sqlite3, sys, time
kind, path, w, n = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
if kind in ("mlnb", "mlnb-pg"):
    from mlnb import audit
    for i in range(n): audit.record(path, "bench.event", {"writer": w, "run": "20261127-101500-ab12cd"}, {"i": i, "status": "done"}, who=f"w{w}")
elif kind == "plain":
    con = sqlite3.connect(path, timeout=60, isolation_level=None)
    con.execute("PRAGMA busy_timeout = 60000"); con.execute("PRAGMA synchronous = NORMAL")
    for i in range(n):
        con.execute("BEGIN IMMEDIATE")
        con.execute("INSERT INTO events (ts, actor, kind, refs, data) VALUES (?,?,?,?,?)",
                    (time.time(), f"w{w}", "bench.event", json.dumps({"writer": w, "run": "20261127-101500-ab12cd"}), json.dumps({"i": i, "status": "done"})))
        con.execute("COMMIT")
else:
    for i in range(n):
        with open(path, "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            f.write(json.dumps({"ts": time.time(), "actor": f"w{w}", "kind": "bench.event", "refs": {"writer": w}, "data": {"i": i}}) + "\n")
            f.flush()
"""


def prepare(kind, d, postgres=None):
    if kind == "mlnb-pg":
        import psycopg
        with psycopg.connect(postgres, autocommit=True) as con: con.execute("DROP TABLE IF EXISTS mlnb_audit_events, mlnb_audit_head")
        return postgres
    if kind == "plain":
        p = d / "plain.db"
        con = sqlite3.connect(p); con.execute("PRAGMA journal_mode = WAL")
        con.execute("CREATE TABLE events (pos INTEGER PRIMARY KEY, ts REAL, actor TEXT, kind TEXT, refs TEXT, data TEXT)"); con.close()
        return p
    return d / ("audit.db" if kind == "mlnb" else "log.jsonl")


def append(kind, writers, per_writer, postgres=None):
    with tempfile.TemporaryDirectory() as t:
        path = prepare(kind, Path(t), postgres)
        t0 = time.perf_counter()
        procs = [subprocess.Popen([sys.executable, "-c", WRITER, kind, str(path), str(w), str(per_writer)]) for w in range(writers)]
        assert all(p.wait() == 0 for p in procs)
        return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=4000, help="events per scenario")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--verify-events", type=int, default=100_000)
    ap.add_argument("--postgres", metavar="URL", help="an empty PostgreSQL database: also measure mlnb's audit log there")
    a = ap.parse_args()
    kinds = ("mlnb", "plain", "jsonl") + (("mlnb-pg",) if a.postgres else ())
    rows = []
    for writers in (1, 8):
        per = a.events // writers
        res = {k: statistics.median(append(k, writers, per, a.postgres) for _ in range(a.repeat)) for k in kinds}
        us = {k: v / a.events * 1e6 for k, v in res.items()}
        rows.append((writers, per, us))
        print(f"{writers} writer(s) x {per}: mlnb {us['mlnb']:.0f} us/event, plain SQLite {us['plain']:.0f}, flock JSONL {us['jsonl']:.0f}; "
              f"mlnb/plain {us['mlnb'] / us['plain']:.2f}x, mlnb/jsonl {us['mlnb'] / us['jsonl']:.2f}x"
              + (f"; mlnb on PostgreSQL {us['mlnb-pg']:.0f} us/event, {us['mlnb-pg'] / us['mlnb']:.2f}x mlnb on SQLite" if a.postgres else ""), flush=True)
    # verify: a log of N events, checked end to end, against reading the same rows without checking
    from mlnb import audit
    with tempfile.TemporaryDirectory() as t:
        path = Path(t) / "audit.db"
        con = audit._connect(path)
        prev, batch = audit.GENESIS, []
        for seq in range(1, a.verify_events + 1):
            ts, refs, data = time.time(), json.dumps({"run": "r"}), json.dumps({"i": seq})
            h = audit._hash(seq, ts, "bench", "bench.event", refs, data, prev)
            batch.append((seq, ts, "bench", "bench.event", refs, data, prev, h)); prev = h
        con.executemany("INSERT INTO events (seq, ts, actor, kind, refs, data, prev, hash) VALUES (?,?,?,?,?,?,?,?)", batch); con.commit(); con.close()
        audit._head_path(path).write_text(f"{a.verify_events:020d} {prev}\n")
        t0 = time.perf_counter(); rep = audit.verify(path); tv = time.perf_counter() - t0
        assert rep["ok"] and rep["events"] == a.verify_events
        t0 = time.perf_counter(); n = len(audit._rows(path)); tr = time.perf_counter() - t0
        t0 = time.perf_counter(); n2 = len(audit.events(path)); te = time.perf_counter() - t0
    print(f"verify {a.verify_events:,} events: {tv:.2f} s ({a.verify_events / tv:,.0f} events/s); reading them: {tr:.2f} s; "
          f"verify/read {tv / tr:.1f}x; listing (parsed) {te:.2f} s")
    out = HERE / "RESULTS-audit.md"
    lines = ["# Audit log benchmark", "", f"`python bench/audit.py` on {os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}; medians of {a.repeat} runs,",
             "each run in fresh processes (interpreter and import included: that is what a CLI call or a stage pays).", "",
             "| writers × events | mlnb (µs/event) | plain SQLite WAL insert | flock JSONL append | mlnb / plain | mlnb / jsonl |", "|---|---|---|---|---|---|"]
    lines += [f"| {w} × {per} | {us['mlnb']:.0f} | {us['plain']:.0f} | {us['jsonl']:.0f} | {us['mlnb'] / us['plain']:.2f} | {us['mlnb'] / us['jsonl']:.2f} |" for w, per, us in rows]
    if a.postgres:
        lines += ["", "mlnb's audit log on PostgreSQL (`audit_log = postgresql://...`, a local server), against mlnb on SQLite:", "",
                  "| writers × events | mlnb on PostgreSQL (µs/event) | PostgreSQL / SQLite |", "|---|---|---|"]
        lines += [f"| {w} × {per} | {us['mlnb-pg']:.0f} | {us['mlnb-pg'] / us['mlnb']:.2f} |" for w, per, us in rows]
    lines += ["", f"`verify` of {a.verify_events:,} events: {tv:.2f} s ({a.verify_events / tv:,.0f} events/s), {tv / tr:.1f}× reading the same rows without checking them."]
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out.relative_to(HERE.parent)}")


if __name__ == "__main__":
    main()
