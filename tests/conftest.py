"Shared fixtures: throwaway mlnb projects with real kernels and a real MLflow SQLite store in a temporary folder."
import json, os, shutil, subprocess, sys, textwrap
from pathlib import Path
import pytest

from mlnb.pipeline import write_stage

ROOT = Path(__file__).resolve().parents[1]
MLNB = [sys.executable, "-c", "from mlnb.cli import main; main()"]
for k in ("MLFLOW_DISABLE_TELEMETRY", "BENTOML_DO_NOT_TRACK", "DO_NOT_TRACK"): os.environ[k] = "true"


def run_mlnb(project, *args, timeout=300, env=None, check=None):
    "Run the real `mlnb` CLI in a subprocess; `check=0/1/...` asserts the exit code and shows the output if not."
    e = {**os.environ, **(env or {})}
    e.pop("MLNB_PROJECT", None)
    p = subprocess.run([*MLNB, "--project", str(project), *args], capture_output=True, text=True, timeout=timeout, env=e, cwd=project)
    if check is not None:
        assert p.returncode == check, f"exit {p.returncode} (wanted {check})\nstdout:\n{p.stdout}\nstderr:\n{p.stderr}"
    return p


GIT = ["git", "-c", "user.name=mlnb tests", "-c", "user.email=tests@mlnb.invalid", "-c", "commit.gpgsign=false"]


def git(project, *args):
    return subprocess.run([*GIT, *args], cwd=project, check=True, capture_output=True, text=True).stdout.strip()


def reference_project(d):
    "A copy of this repository's ML project (settings and reference pipeline) in `d`, committed to its own git repository."
    d = Path(d); d.mkdir(parents=True, exist_ok=True)
    shutil.copy(ROOT / "settings.ini", d / "settings.ini")
    shutil.copytree(ROOT / "nbs/pipeline", d / "nbs/pipeline")
    (d / ".gitignore").write_text(".mlnb/\n")
    git(d, "init", "-q"); git(d, "add", "-A"); git(d, "commit", "-qm", "reference project")
    return d


def run_json(project, *args, **kw):
    p = run_mlnb(project, *args, "--json", check=0, **kw)
    return json.loads(p.stdout)


def statuses(rec):
    return {n: s["status"] for n, s in rec["stages"].items()}


@pytest.fixture
def project(tmp_path):
    "An empty project: settings.ini and a pipeline folder; stages are added with `add_stage`."
    (tmp_path / "settings.ini").write_text(textwrap.dedent("""\
        [mlnb]
        pipeline = pipeline
        experiment = test
        model_name = test-model
        jobs = 1
        prestart = 1
        """))
    (tmp_path / "pipeline").mkdir()
    return tmp_path


def add_stage(project, name, params="upstream = []", *code, markdown=""):
    return write_stage(project / "pipeline" / f"{name}.ipynb", params, *code, markdown=markdown)


@pytest.fixture
def chain(project):
    "A three-stage chain a -> b -> c that passes a number along and records metrics."
    add_stage(project, "a", "upstream = []\nn = 3", "from mlnb import stage\nstage.save('nums', {'n': n})\nstage.log_metric('n', n)")
    add_stage(project, "b", "upstream = ['a']\nfactor = 2",
              "from mlnb import stage\nx = stage.load('nums')['n'] * factor\nstage.save('doubled', {'x': x})")
    add_stage(project, "c", "upstream = ['b']", "from mlnb import stage\nstage.save('out', {'y': stage.load('doubled')['x'] + 1})")
    return project


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); return s.getsockname()[1]


class Served:
    "A `mlnb serve` of a bento on a free port of 127.0.0.1, waited for until ready; stopped by `stop()`."
    def __init__(self, project, tag, env=None, timeout=120):
        import httpx, time
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        e = {**os.environ, **(env or {})}
        e.pop("MLNB_PROJECT", None)
        self.proc = subprocess.Popen([*MLNB, "--project", str(project), "serve", tag, "--port", str(self.port)], env=e,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                if httpx.get(self.url + "/readyz", timeout=1).status_code == 200: break
            except httpx.HTTPError: pass
            if self.proc.poll() is not None: raise RuntimeError(self.proc.stdout.read())
            time.sleep(0.5)
        else:
            self.stop(); raise RuntimeError("service did not become ready")
        self.client = httpx.Client(base_url=self.url, timeout=30)

    def stop(self):
        import signal
        try: os.killpg(self.proc.pid, signal.SIGTERM)
        except ProcessLookupError: return
        try: self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired: os.killpg(self.proc.pid, signal.SIGKILL)
