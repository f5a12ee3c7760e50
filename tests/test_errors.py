"Bad input through the real CLI: one line on stderr naming what was wrong and what would be accepted, and the exit code."
import json
import pytest
from conftest import MLNB, add_stage, run_mlnb
import subprocess


def error_line(p):
    lines = [l for l in p.stderr.splitlines() if l.strip()]
    assert lines and lines[-1].startswith("mlnb: error: "), p.stderr
    assert "Traceback" not in p.stderr, p.stderr
    return lines[-1]


def test_cycle(project):
    add_stage(project, "a", "upstream = ['b']"); add_stage(project, "b", "upstream = ['a']")
    msg = error_line(run_mlnb(project, "run", check=1))
    assert "the stages form a cycle: " in msg and ("a -> b -> a" in msg or "b -> a -> b" in msg)


def test_unknown_upstream(project):
    add_stage(project, "a"); add_stage(project, "b", "upstream = ['ingst']")
    msg = error_line(run_mlnb(project, "run", check=1))
    assert "stage 'b' declares upstream 'ingst', which is not a stage; stages: a, b" in msg


def test_notebook_without_parameters_cell(project):
    add_stage(project, "a")
    nb = json.loads((project / "pipeline/a.ipynb").read_text())
    nb["cells"][0]["metadata"]["tags"] = []
    (project / "pipeline/a.ipynb").write_text(json.dumps(nb))
    msg = error_line(run_mlnb(project, "run", check=1))
    assert "stage notebook a.ipynb has no cell tagged 'parameters'" in msg and "upstream" in msg


def test_parameter_no_stage_has(chain):
    msg = error_line(run_mlnb(chain, "run", "-p", "factr=3", check=1))
    assert "no stage has a parameter 'factr'; parameters: a.n, b.factor" in msg


def test_bad_parameter_value_type(chain):
    msg = error_line(run_mlnb(chain, "run", "-p", "factor=two", check=1))
    assert "-p factor='two': expected int (default 2)" in msg
    msg = error_line(run_mlnb(chain, "run", "-p", "factor", check=1))
    assert "expected name=value or stage.name=value" in msg
    msg = error_line(run_mlnb(chain, "run", "-p", "z.factor=1", check=1))
    assert "pipeline has no stage 'z'; stages: a, b, c" in msg


def test_unknown_stage_in_selection(chain):
    msg = error_line(run_mlnb(chain, "run", "--only", "trian", check=1))
    assert "pipeline has no stage 'trian'; stages: a, b, c" in msg
    msg = error_line(run_mlnb(chain, "inspect", "trian", check=1))
    assert "pipeline has no stage 'trian'" in msg


def test_missing_settings(tmp_path):
    p = subprocess.run([*MLNB, "run"], cwd=tmp_path, capture_output=True, text=True)
    assert p.returncode == 1
    assert "no settings.ini with an [mlnb] section" in error_line(p) and "--project" in error_line(p)


def test_malformed_settings(project):
    (project / "settings.ini").write_text("[mlnb]\njobs = 2\nthis line is not a setting\n")
    assert "settings.ini is malformed" in error_line(run_mlnb(project, "run", check=1))
    (project / "settings.ini").write_text("[mlnb]\njobs = lots\n")
    assert "jobs = 'lots' is not an integer" in error_line(run_mlnb(project, "run", check=1))


def test_bad_setting_from_environment(chain):
    msg = error_line(run_mlnb(chain, "run", env={"MLNB_STAGE_TIMEOUT": "soon"}, check=1))
    assert "MLNB_STAGE_TIMEOUT: stage_timeout = 'soon' is not a number" in msg


def test_unreachable_tracking_uri(chain):
    msg = error_line(run_mlnb(chain, "run", env={"MLNB_TRACKING_URI": "http://127.0.0.1:9"}, check=1))
    assert "MLflow tracking server http://127.0.0.1:9 is unreachable" in msg and "sqlite:///" in msg
    assert not (chain / ".mlnb/runs").exists() or not list((chain / ".mlnb/runs").iterdir()), "nothing ran"


def test_unsupported_tracking_uri(chain):
    msg = error_line(run_mlnb(chain, "run", env={"MLNB_TRACKING_URI": "ftp://example"}, check=1))
    assert "tracking URI 'ftp://example' is not supported" in msg


def test_usage_errors_exit_2(chain):
    p = run_mlnb(chain, "run", "--jobs", "0")
    assert p.returncode == 2 and "--jobs" in p.stderr
    p = run_mlnb(chain, "run", "--only", "a", "--from", "b")
    assert p.returncode == 2 and "--only and --from" in p.stderr
    assert run_mlnb(chain, "nosuchcommand").returncode == 2


def test_help_and_version_everywhere(chain):
    from mlnb import __version__
    p = run_mlnb(chain, "--version", check=0)
    assert __version__ in p.stdout
    for cmd in ("run", "status", "show", "inspect", "sync"):
        p = run_mlnb(chain, cmd, "--help", check=0)
        assert "Usage:" in p.stdout and "--help" in p.stdout
        assert run_mlnb(chain, cmd, "-h", check=0).stdout == p.stdout


def test_verbose_shows_traceback(chain):
    p = run_mlnb(chain, "-v", "run", "-p", "factr=3", check=1)
    assert "Traceback" in p.stderr and p.stderr.strip().splitlines()[-1].startswith("mlnb: error:")


@pytest.mark.slow
def test_unsaveable_product_and_missing_product_name_what_is_accepted(project):
    add_stage(project, "a", "upstream = []", "from mlnb import stage\nstage.save('s', {1, 2})")
    msg = error_line(run_mlnb(project, "run", check=1))
    assert "cannot save a set as a product; accepted: a pandas DataFrame" in msg
    add_stage(project, "a", "upstream = []", "from mlnb import stage\nstage.save('t', {'x': 1})")
    add_stage(project, "b", "upstream = ['a']", "from mlnb import stage\nstage.load('tt')")
    msg = error_line(run_mlnb(project, "run", check=1))
    assert "no upstream product 'tt'; available: a: t" in msg


# --- settings are checked when loaded, before any stage runs (issue 10, point 7) ---

import os, re, sys, time
from pathlib import Path
from conftest import ROOT, reference_project


def settings(project, *lines, base="pipeline = pipeline\n"):
    (project / "settings.ini").write_text("[mlnb]\n" + base + "".join(l + "\n" for l in lines))


def nothing_ran(project):
    runs = project / ".mlnb" / "runs"
    return not runs.exists() or not list(runs.iterdir())


def test_unknown_setting_names_the_closest_key(chain):
    settings(chain, "jobs = 1", "serve_worker = 2")
    assert error_line(run_mlnb(chain, "run", check=1)) == ("mlnb: error: settings.ini line 4: serve_worker = 2 is not a setting "
                                                          "(did you mean serve_workers?); the settings are listed in the README (Settings) and in mlnb.config.SETTINGS")
    settings(chain)
    msg = error_line(run_mlnb(chain, "run", env={"MLNB_MAX_BATHC": "50"}, check=1))
    assert "MLNB_MAX_BATHC=50 is not a setting (did you mean MLNB_MAX_BATCH?)" in msg and "MLNB_PROJECT, MLNB_ACTOR" in msg
    assert nothing_ran(chain)


def test_gate_typo_fails_the_run_at_once_before_any_stage(chain):
    "`gate_max_p95_latency` (without _ms) used to remove the latency gate without a word."
    settings(chain, "target = y", "gate_max_p95_latency = 50")
    t0 = time.time()
    msg = error_line(run_mlnb(chain, "run", check=1))
    took = time.time() - t0
    assert "gate_max_p95_latency in settings.ini: no such gate (did you mean gate_max_p95_latency_ms?)" in msg
    assert nothing_ran(chain) and took < 5, took  # a process start and the check; no kernel, no stage
    for line, says in [("gate_min_rmse = 5", "gate_min_rmse in settings.ini: rmse is not a binary metric"),
                       ("gate_min_roc_auc = 80", "gate_min_roc_auc = 80 is outside the scale of roc_auc, 0 to 1 (did you mean 0.8?)"),
                       ("gate_max_demographic_parity_difference = 0.1", "need the sensitive attribute: add sensitive = COLUMN"),
                       ("policy_required_gates = min_auc", "policy_required_gates names unknown gate(s) min_auc (did you mean min_roc_auc?)")]:
        settings(chain, "target = y", line)
        assert says in error_line(run_mlnb(chain, "run", check=1)), line
    settings(chain, "gate_min_roc_auc = 0.8")  # a gate needs a task, and a task its target
    assert "settings.ini [mlnb] has no target" in error_line(run_mlnb(chain, "run", check=1))
    assert nothing_ran(chain)


def test_every_value_is_typed_and_range_checked(chain):
    cases = [("stage_timeout = nan", "settings.ini line 3: stage_timeout = 'nan' is not a finite number; accepted: a number > 0"),
             ("stage_timeout = inf", "stage_timeout = 'inf' is not a finite number"),
             ("stage_timeout = -5", "stage_timeout = '-5' is out of range; accepted: a number > 0"),
             ("promotion = sometimes", "promotion = 'sometimes' is not accepted; accepted: auto, manual"),
             ("gate_min_roc_auc = high", "gate_min_roc_auc = 'high' is not a number"),
             ("threshold = 1.5", "threshold = '1.5' is out of range; accepted: a number between 0 and 1, both excluded"),
             ("canary_share = 2", "canary_share = '2' is out of range; accepted: a number from 0 to 1"),
             ("jobs = 0", "jobs = '0' is out of range; accepted: an integer >= 1"),
             ("policy_champion_clean_git = maybe", "policy_champion_clean_git = 'maybe' is not accepted; accepted: true, false"),
             ("task = binery", "task = 'binery' is not accepted; accepted: binary, multiclass, regression (did you mean binary?)"),
             ("drift_alpha = 0", "drift_alpha = '0' is out of range")]
    for line, says in cases:
        settings(chain, line)
        assert says in error_line(run_mlnb(chain, "run", check=1)), line
    assert nothing_ran(chain)


def test_bad_environment_values_are_one_line_for_every_command(chain):
    settings(chain)
    for cmd, var, value, says in [("build", "MLNB_MAX_BATCH", "abc", "MLNB_MAX_BATCH: max_batch = 'abc' is not an integer; accepted: an integer from 1 to 1000000"),
                                  ("serve", "MLNB_SERVE_WORKERS", "0", "MLNB_SERVE_WORKERS: serve_workers = '0' is out of range"),
                                  ("serve", "MLNB_RELOAD_INTERVAL", "-1", "reload_interval = '-1' is out of range; accepted: a number from 0 to 86400"),
                                  ("promote", "MLNB_PROMOTION", "always", "promotion = 'always' is not accepted"),
                                  ("monitor", "MLNB_DRIFT_SHARE", "lots", "drift_share = 'lots' is not a number")]:
        args = [cmd, "1", "-m", "x"] if cmd == "promote" else [cmd]
        assert says in error_line(run_mlnb(chain, *args, env={var: value}, check=1)), cmd


def test_variables_that_are_not_settings_and_empty_values_are_accepted(chain):
    settings(chain, "experiment =", "gate_min_roc_auc =", "policy_required_gates =")  # empty: the default
    env = {"MLNB_ACTOR": "alice", "MLNB_GC_FREEZE": "0", "MLNB_SERVING_SETTINGS": "/nowhere/serving.json"}
    assert run_mlnb(chain, "audit", env=env, check=0).stdout.strip() == "no audit events match"


def test_settings_not_utf8(chain):
    (chain / "settings.ini").write_bytes(b"[mlnb]\npipeline = pipeline\nmodel_name = caf\xe9\n")
    msg = error_line(run_mlnb(chain, "run", check=1))
    assert msg == f"mlnb: error: {chain.resolve() / 'settings.ini'}: line 3 (byte 43) holds b'\\xe9', which is not UTF-8; settings.ini must be UTF-8: save it as UTF-8"
    (chain / "settings.ini").write_bytes("\ufeff[mlnb]\npipeline = pipeline\nmodel_name = café\n".encode())  # UTF-8 with a BOM is fine
    run_mlnb(chain, "audit", check=0)


def test_corrupt_audit_log(chain):
    db = chain / ".mlnb" / "audit.db"
    db.parent.mkdir()
    db.write_bytes(os.urandom(4096))
    for args in (["audit"], ["audit", "verify"], ["run"]):
        msg = error_line(run_mlnb(chain, *args, check=1))
        assert msg == (f"mlnb: error: audit log {db.resolve()} is not a SQLite database (the file is corrupt or was overwritten); "
                       "it can be neither checked nor appended to: keep it as evidence, move it aside together with audit.db.head "
                       "(e.g. add .corrupt to both names), and `mlnb audit verify` starts a new log"), args
    assert nothing_ran(chain)
    db.rename(db.with_name("audit.db.corrupt"))
    assert run_mlnb(chain, "audit", "verify", check=0).stdout.strip().endswith("0 events, chain intact")


def test_damaged_page_of_the_audit_log(chain):
    "A real log with one page overwritten: no command trusts it, and the run does not start."
    from mlnb.audit import record
    db = chain / ".mlnb" / "audit.db"
    code = f"from mlnb.audit import record\nfor i in range(300): record({str(db)!r}, 'test.event', {{'n': i}}, {{'text': 'x' * 200}})"
    subprocess.run([sys.executable, "-c", code], check=True)
    assert run_mlnb(chain, "audit", "verify", check=0).stdout.strip().endswith("300 events, chain intact")
    with open(db, "r+b") as f: f.seek(4096 * 3); f.write(b"\xff" * 4096)
    for args in (["audit", "verify"], ["run"]):
        msg = error_line(run_mlnb(chain, *args, check=1))
        assert f"audit log {db.resolve()} is corrupt (database disk image is malformed" in msg and "move it aside" in msg, msg
    assert nothing_ran(chain)


def test_reference_and_new_projects_load(tmp_path):
    "This repository's settings and what `mlnb new` writes for each task pass every check."
    ref = reference_project(tmp_path / "ref")
    assert run_mlnb(ref, "audit", "verify", check=0).stdout.strip().endswith("chain intact")
    for task in ("binary", "multiclass", "regression"):
        p = subprocess.run([*MLNB, "new", str(tmp_path / task), "--task", task], capture_output=True, text=True, cwd=tmp_path)
        assert p.returncode == 0, p.stderr
        run_mlnb(tmp_path / task, "audit", "verify", check=0)


def test_every_key_the_code_reads_is_declared():
    "A setting read anywhere in mlnb is in mlnb.config.SETTINGS, so loading accepts it; so is every key of the README's table."
    from mlnb.config import SETTINGS, ENVIRONMENT, ENV_PREFIX, setting_of
    from mlnb.tasks import TASKS
    from mlnb.monitor import DEFAULTS
    assert SETTINGS["task"].accepted == TASKS
    src = "\n".join(p.read_text() for p in (ROOT / "mlnb").glob("*.py"))
    read = set(re.findall(r'\b(?:cfg|extra|raw)\.(?:get|flag)\(\s*"([a-z0-9_]+)"', src)) | set(DEFAULTS)
    read |= set(re.findall(r'\.extra\b[^\n]*?\)\.get\(\s*"([a-z0-9_]+)"', src))  # (cfg.extra if ... else cfg).get("key")
    assert len(read) > 20 and not [k for k in read if setting_of(k) is None], [k for k in read if setting_of(k) is None]
    env = set(re.findall(r'"(MLNB_[A-Z0-9_]+)"', src))
    assert not [v for v in env if v not in ENVIRONMENT and setting_of(v[len(ENV_PREFIX):].lower()) is None], env
    readme = re.search(r"## Settings\n(.*?)\n## ", (ROOT / "README.md").read_text(), re.S).group(1)
    keys = {k.replace("<metric>", "roc_auc") for row in re.findall(r"^\| (.*?) \|", readme, re.M) for k in re.findall(r"`([a-z0-9_<>]+)`", row)}
    assert len(keys) > 30 and not [k for k in keys if setting_of(k) is None], [k for k in keys if setting_of(k) is None]
