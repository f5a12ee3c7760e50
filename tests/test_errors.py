"Bad input through the real CLI: one line on stderr naming what was wrong and what would be accepted, and the exit code."
import json
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


def test_unsaveable_product_and_missing_product_name_what_is_accepted(project):
    add_stage(project, "a", "upstream = []", "from mlnb import stage\nstage.save('s', {1, 2})")
    msg = error_line(run_mlnb(project, "run", check=1))
    assert "cannot save a set as a product; accepted: a pandas DataFrame" in msg
    add_stage(project, "a", "upstream = []", "from mlnb import stage\nstage.save('t', {'x': 1})")
    add_stage(project, "b", "upstream = ['a']", "from mlnb import stage\nstage.load('tt')")
    msg = error_line(run_mlnb(project, "run", check=1))
    assert "no upstream product 'tt'; available: a: t" in msg
