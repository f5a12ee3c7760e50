"What `mlnb run` shows while it runs (a live line on a terminal, plain lines elsewhere), and executed notebooks JupyterLab opens."
import json, os, re, select, subprocess, time
from pathlib import Path
import pytest
from conftest import MLNB, add_stage, run_mlnb, statuses

CONTROL = re.compile(r"\x1b|\r")  # escape sequences and carriage returns: what a live line is drawn with


def contents(project):
    "JupyterLab's own file access (jupyter_server's contents manager), rooted at the project as `jupyter lab` there would be."
    from jupyter_server.services.contents.filemanager import FileContentsManager
    return FileContentsManager(root_dir=str(project))


def row(k, n, text): return f"  [{k}/3] {n:<14} {text}"


def fan_out(project, slow=11):
    "root, then two independent stages: `slow` sleeps `slow` seconds, `quick` one second (in run order: root, quick, slow)."
    add_stage(project, "root", "upstream = []", "from mlnb import stage\nstage.save('r', {'r': 1})")
    add_stage(project, "slow", f"upstream = ['root']\nseconds = {slow}", "import time\ntime.sleep(seconds)", "from mlnb import stage\nstage.save('s', {'s': 1})")
    add_stage(project, "quick", "upstream = ['root']", "import time\ntime.sleep(1)", "from mlnb import stage\nstage.save('q', {'q': 1})")


@pytest.mark.slow
def test_plain_lines_off_a_terminal_and_notebooks_jupyterlab_opens(project):
    "Off a terminal (CI, pipes): numbered stage lines, a `still running` line for a long stage, no control characters; the printed notebooks open."
    fan_out(project)
    p = run_mlnb(project, "run", "-j", "2", "--json", check=0)
    rec = json.loads(p.stdout)  # --json: stdout holds the record only
    assert not CONTROL.search(p.stderr), repr(p.stderr)
    lines = p.stderr.splitlines()
    def at(text): return next(i for i, l in enumerate(lines) if l.startswith(text))
    assert at(row(1, "root", "✓ ran")) < min(at(row(3, "slow", "▶ running")), at(row(2, "quick", "▶ running"))), p.stderr
    still = [l for l in lines if "still running" in l]
    assert still == [row(3, "slow", "… still running (10s)")], p.stderr  # the quick stage never says it
    assert at(row(2, "quick", "✓ ran")) < at(row(3, "slow", "… still running")) < at(row(3, "slow", "✓ ran")), "-j 2: both ran at once"
    # the end-of-run line names a visible folder, relative to the project, that JupyterLab opens
    end = next(l for l in lines if "executed notebooks in" in l)
    shown = end.split("executed notebooks in ")[1]
    assert shown == f"runs/{rec['run_id']}" == rec["visible_notebooks"], end
    cm = contents(project)
    for n in ("root", "slow", "quick"):
        assert rec["stages"][n]["visible_notebook"] == f"{shown}/{n}.ipynb"
        assert cm.get(f"{shown}/{n}.ipynb")["type"] == "notebook"
        assert (project / shown / f"{n}.ipynb").samefile(rec["stages"][n]["notebook"]), "a hard link to the run folder's notebook"
    # why: the same contents manager refuses the notebook under .mlnb, so this test could fail
    from tornado.web import HTTPError
    hidden = Path(rec["stages"]["slow"]["notebook"]).relative_to(project)
    assert hidden.parts[0] == ".mlnb" and (project / hidden).exists()
    with pytest.raises(HTTPError) as e: cm.get(str(hidden))
    assert e.value.status_code == 404
    # reused stages get theirs too, in the new run's folder
    again = json.loads(run_mlnb(project, "run", "--json", check=0).stdout)
    assert statuses(again) == {"root": "cached", "slow": "cached", "quick": "cached"}
    assert cm.get(f"runs/{again['run_id']}/slow.ipynb", content=True)["content"]["cells"]


def test_executed_dir_must_be_a_visible_folder_inside_the_project(project):
    add_stage(project, "a", "upstream = []", "x = 1")
    p = run_mlnb(project, "run", env={"MLNB_EXECUTED_DIR": "../elsewhere"}, check=1)
    assert "executed_dir = '../elsewhere' is not a folder inside the project" in p.stderr
    p = run_mlnb(project, "run", env={"MLNB_EXECUTED_DIR": ".mlnb/notebooks"}, check=1)
    assert "JupyterLab does not open hidden paths" in p.stderr
    assert not (project / ".mlnb/runs").exists() or not list((project / ".mlnb/runs").iterdir()), "refused before anything ran"
    rec = json.loads(run_mlnb(project, "run", "--json", env={"MLNB_EXECUTED_DIR": "notebooks/executed"}, check=0).stdout)
    assert rec["stages"]["a"]["visible_notebook"] == f"notebooks/executed/{rec['run_id']}/a.ipynb"
    assert (project / rec["stages"]["a"]["visible_notebook"]).exists()


def run_on_a_terminal(project, *args, timeout=180):
    "`mlnb run` with stderr on a pseudo-terminal (as in a shell) and stdout on a pipe; returns (exit code, stdout, what the terminal got)."
    import pty
    master, slave = pty.openpty()
    env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": "160"}
    for k in ("MLNB_PROJECT", "FORCE_COLOR", "NO_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE", "CI"): env.pop(k, None)
    proc = subprocess.Popen([*MLNB, "--project", str(project), "run", *args], stdout=subprocess.PIPE, stderr=slave,
                            stdin=subprocess.DEVNULL, env=env, cwd=project)
    os.close(slave)
    got, deadline = b"", time.time() + timeout
    while time.time() < deadline:
        ready, _, _ = select.select([master], [], [], 0.2)
        if ready:
            try: data = os.read(master, 65536)
            except OSError: break  # the terminal closed: every process that had it ended
            if not data: break
            got += data
        elif proc.poll() is not None and not select.select([master], [], [], 0.5)[0]: break
    out = proc.stdout.read().decode()
    proc.wait(timeout=30); os.close(master)
    return proc.returncode, out, got.decode(errors="replace")


def test_live_line_on_a_terminal(project):
    "On a terminal: one line redrawn in place, with the done count and each running stage's seconds ticking; the stage lines stay."
    fan_out(project, slow=4)
    code, out, term = run_on_a_terminal(project, "-j", "2")
    assert code == 0, term
    assert "\x1b[2K" in term, "the live line is redrawn in place"
    frames = [re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", f) for f in re.split(r"\r|\x1b\[2K", term)]
    slow = sorted({float(m) for f in frames for m in re.findall(r"\[3/3\] slow (\d+\.\d)s", f)})
    assert len(slow) >= 5 and slow[-1] >= 3.0, f"the running stage's seconds tick: {slow}"
    both = r"1/3 done  running (\[2/3\] quick \d+\.\ds, \[3/3\] slow \d+\.\ds|\[3/3\] slow \d+\.\ds, \[2/3\] quick \d+\.\ds)"
    assert any(re.search(both, f) for f in frames), "-j 2: both running stages in the live line, each with its seconds"
    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", term)
    for k, n in ((1, "root"), (2, "quick"), (3, "slow")): assert row(k, n, "✓ ran") in plain, plain
    assert any(re.match(r"\S+ logging the run to MLflow \d+\.\ds", f) for f in frames), "the wait for MLflow after the stages is shown too"
    assert re.search(r"\x1b\[2Krun \d{8}-\d{6}-[0-9a-f]{6} done: 3 ran", term), "the live line is erased before the end-of-run line"
    assert re.fullmatch(r"\d{8}-\d{6}-[0-9a-f]{6}\n", out), f"stdout holds the run id only: {out!r}"


def test_failure_on_a_terminal_leaves_one_clean_line(project):
    "A failed stage ends the live line; the failure line comes after it, whole, with the author's cell and a visible notebook."
    add_stage(project, "a", "upstream = []", "x = 1", "raise ValueError('no')")
    code, out, term = run_on_a_terminal(project)
    assert code == 1 and out == "", term
    last = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", term).replace("\r", "").strip().splitlines()[-1]
    assert re.fullmatch(r"mlnb: error: stage 'a' failed in code cell 3 of a\.ipynb, line 1 \(the cell starting `raise ValueError\('no'\)`\): "
                        r"ValueError: no \(executed notebook: runs/\d{8}-\d{6}-[0-9a-f]{6}/a\.ipynb\)", last), last


def test_a_failed_run_leaves_no_event_loop_to_the_garbage_collector(project):
    """jupyter_client's blocking calls give each thread that makes them an asyncio loop; one left open is closed by the
    garbage collector at exit, sometimes after its own socket, and then `ValueError: Invalid file descriptor: -1` comes
    after the command's last line. With ResourceWarnings shown, every loop left open says so: none may be."""
    add_stage(project, "a", "upstream = []", "x = 1")
    add_stage(project, "b", "upstream = ['a']", "raise ValueError('no')")
    add_stage(project, "c", "upstream = ['b']", "y = 2")
    for _ in range(2):
        p = run_mlnb(project, "run", "--force", env={"PYTHONWARNINGS": "always::ResourceWarning"}, check=1)
        assert "unclosed event loop" not in p.stderr and "Invalid file descriptor" not in p.stderr, p.stderr
        last = [x for x in p.stderr.splitlines() if "ResourceWarning" not in x and not x.startswith(" ")][-1]
        assert last.startswith("mlnb: error: stage 'b' failed"), p.stderr


def test_git_ignores_the_executed_notebooks(tmp_path):
    "`runs/` is ignored in this repository and in what `mlnb new` writes (a folder named runs deeper down is not)."
    from conftest import ROOT
    def ignored(repo, path): return subprocess.run(["git", "check-ignore", "-q", path], cwd=repo).returncode == 0
    assert ignored(ROOT, "runs/20260101-000000-abcdef/train.ipynb") and not ignored(ROOT, "nbs/runs/train.ipynb")
    subprocess.run([*MLNB, "new", str(tmp_path / "p"), "--task", "binary"], check=True, capture_output=True, timeout=300)
    subprocess.run(["git", "init", "-q"], cwd=tmp_path / "p", check=True)
    assert ignored(tmp_path / "p", "runs/20260101-000000-abcdef/train.ipynb") and ignored(tmp_path / "p", ".mlnb/runs/x/notebooks/train.ipynb")
