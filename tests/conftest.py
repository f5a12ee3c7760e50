"Shared fixtures: throwaway mlnb projects with real kernels and a real MLflow SQLite store in a temporary folder."
import json, os, shutil, subprocess, sys, textwrap, time
from pathlib import Path
import pytest

from mlnb.pipeline import write_stage

ROOT = Path(__file__).resolve().parents[1]
MLNB = [sys.executable, "-c", "from mlnb.cli import main; main()"]
for k in ("MLFLOW_DISABLE_TELEMETRY", "BENTOML_DO_NOT_TRACK", "DO_NOT_TRACK"): os.environ[k] = "true"


def wait_for(check, timeout=60, what=None, every=0.2):
    "Poll `check` until it returns something true, and return that; after `timeout` s fail, naming `what` (or its docstring)."
    deadline = time.time() + timeout
    while time.time() < deadline:
        out = check()
        if out: return out
        time.sleep(every)
    raise AssertionError(f"not within {timeout} s: {what or check.__doc__ or check}")


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


# Modules whose tests share one project (a module fixture) and build on each other in order: with pytest-xdist (`-n`),
# one worker runs each of these modules whole; every other test goes to whichever worker is free.
ONE_WORKER = ("test_reference.py", "test_registry.py", "test_serving.py", "test_trust_registry.py")
# Modules of long tests that make projects of their own: handed out between the modules above, so that while one worker
# waits for the session's reference run (which those modules start from) the other has long work that does not.
LONG_ALONE = ("test_new.py", "test_monitor.py")
# Modules that use the session's `team_stack` (PostgreSQL, an MLflow server and a Dask cluster on 127.0.0.1): with xdist
# they are one scope, so one worker runs them all and the stack starts once; handed out first (the longest scope).
TEAM = ("test_stack.py", "test_dask.py", "test_team_tracking.py", "test_team_audit.py")
TEAM_SCOPE = "team-stack"
# Modules of small projects spread among the long tests above: those whose tests mostly wait (stage timeouts, Ctrl-C
# escalation, sleeping stages), so that a core waits while the other worker's long test keeps both busy instead of both
# workers waiting at the session's end; and test_tracking.py, whose tests of new MLflow stores take up to 20 s each and
# would otherwise end the session on one worker. What is left after them are short tests, which end it evenly.
SPREAD = ("test_pipeline.py", "test_progress.py", "test_trust_engine.py", "test_sweep.py", "test_tracking.py")

if os.environ.get("PYTEST_XDIST_WORKER"):
    # xdist already keeps every core busy: OpenMP threads in each worker's stages (scikit-learn's training) would only
    # oversubscribe them and spin. The benchmarks under bench/ run without this.
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_xdist_make_scheduler(config, log):
    """xdist's `loadscope` scheduling with a scope per module of ONE_WORKER, one scope for all the TEAM modules, and a
    scope per test elsewhere. (xdist's own `--dist loadgroup` does this with marks, but silently stops grouping on
    pytest 9.2: pytest-xdist#1386.) The TEAM scope goes first, then the shared modules, each followed by a test of
    LONG_ALONE, with the tests of SPREAD spread evenly among them, then the rest in order."""
    from collections import OrderedDict
    from xdist.scheduler import LoadScopeScheduling
    module = lambda scope: Path(scope.split("::", 1)[0]).name
    class ModulesTogether(LoadScopeScheduling):
        ordered = False
        def _split_scope(self, nodeid):
            if module(nodeid) in TEAM: return TEAM_SCOPE
            return nodeid.split("::", 1)[0] if module(nodeid) in ONE_WORKER else nodeid
        def _assign_work_unit(self, node):
            if not self.ordered:  # the first call, right after the queue is made: order it once
                self.ordered = True
                shared = [s for s in self.workqueue if module(s) in ONE_WORKER]
                long = [s for s in self.workqueue if module(s) in LONG_ALONE]
                spread = [s for s in self.workqueue if module(s) in SPREAD]
                heavy = [s for pair in zip(shared, long) for s in pair] + shared[len(long):] + long[len(shared):]
                order = [s for s in self.workqueue if s == TEAM_SCOPE]
                for i, s in enumerate(heavy):  # after each long one, its share of those spread
                    order += [s, *spread[len(spread) * i // len(heavy):len(spread) * (i + 1) // len(heavy)]]
                placed = set(order)
                order += [s for s in self.workqueue if s not in placed]
                self.workqueue = OrderedDict((s, self.workqueue[s]) for s in order)
            super()._assign_work_unit(node)
    return ModulesTogether(config, log)


def _shared(tmp_path_factory, name: str, make):
    """`make(folder)` once per test session, even with pytest-xdist's workers: the first worker to get here makes it, under a
    file lock, and writes what it returns (JSON) beside it; the others read that. Without xdist, simply once."""
    import fcntl
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"): base = base.parent  # xdist: one base folder per worker, under the session's
    root = base / f"shared-{name}"
    root.mkdir(exist_ok=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        done = root / "made.json"
        if not done.exists():
            out = make(root / "made")
            done.write_text(json.dumps(out))
        return json.loads(done.read_text())


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory):
    """The reference pipeline run once per test session (`mlnb run --jobs 2` in a copy of the reference project), and a
    pristine copy of the cache it left, taken before any test touches the project: (project, run record, cache folder)."""
    def make(d):
        d = reference_project(d)
        first = run_json(d, "run", "--jobs", "2", timeout=600)
        shutil.copytree(d / ".mlnb" / "cache", d.parent / "cache")  # real copies: a test that changes its products changes only its own
        return [str(d), first, str(d.parent / "cache")]
    d, first, cache = _shared(tmp_path_factory, "reference", make)
    return Path(d), first, Path(cache)


@pytest.fixture(scope="session")
def team_stack(tmp_path_factory):
    """The team stack on 127.0.0.1, started once per test session by `mlnb.stack.Stack` (what `mlnb stack up` runs) and
    stopped at its end. `.pg`: the Postgres (`.url(db)`, `.create_database(name)`); `.mlflow_uri`: the MLflow server;
    `.scheduler`: the Dask scheduler's address; `.cluster`: the DaskCluster (`.workers` [(name, pid)], `.kill_worker`,
    `.add_worker`; a test that kills one of its workers adds it back by name); `.settings`: what a project sets
    (tracking_uri, audit_log, executor, dask_scheduler); `.folder`; `.seconds`: how long it took to start."""
    from types import SimpleNamespace
    from mlnb.stack import Stack
    folder = tmp_path_factory.mktemp("team-stack")
    stack = Stack(folder, workers=2)
    settings = stack.up()  # a part that fails stops the others before this raises
    _TEAM_STACKS.append(folder)
    try:
        yield SimpleNamespace(pg=stack.pg, mlflow_uri=stack.mlflow.uri, scheduler=stack.cluster.address, cluster=stack.cluster,
                              settings=settings, folder=stack.folder, seconds=stack.seconds, stack=stack)
    finally:
        Stack.down(folder)  # nothing left to stop if the last TEAM test stopped it already


_TEAM_STACKS: list = []  # the folders of the team stacks this process started


def pytest_runtest_teardown(item, nextitem):
    """With xdist one worker runs the TEAM modules' tests one after another (one scope): after the last of them, the team
    stack stops instead of idling until the session ends (Dask's heartbeats and MLflow's workers: a tenth of a core)."""
    if (_TEAM_STACKS and os.environ.get("PYTEST_XDIST_WORKER") and Path(str(item.path)).name in TEAM
            and (nextitem is None or Path(str(nextitem.path)).name not in TEAM)):
        from mlnb.stack import Stack
        while _TEAM_STACKS: Stack.down(_TEAM_STACKS.pop())


def reference_project_reusing(d, reference_run):
    """A reference project in `d` whose cache starts as the session's reference run left it: its first `mlnb run` reuses
    every stage's products (same code, parameters and data, so the same cache keys) but registers its model in this
    project's own MLflow store (the cached register stage's version is not in it, so the stage runs again)."""
    d = reference_project(d)
    shutil.copytree(reference_run[2], d / ".mlnb" / "cache")
    return d


def run_json(project, *args, **kw):
    p = run_mlnb(project, *args, "--json", check=0, **kw)
    return json.loads(p.stdout)


def statuses(rec):
    return {n: s["status"] for n, s in rec["stages"].items()}


@pytest.fixture
def project(tmp_path):
    "An empty project: settings.ini and a pipeline folder; stages are added with `add_stage`."
    # notebook_pages = false: the stages' HTML pages in MLflow are test_tracking.py's to check (its `project` turns them back
    # on, as they are by default, and so do the reference project and `mlnb new`'s); rendering them is a process of its own
    # after every run that executed a stage (~0.7 s of CPU), which the other tests of these small projects do not look at
    (tmp_path / "settings.ini").write_text(textwrap.dedent("""\
        [mlnb]
        pipeline = pipeline
        experiment = test
        model_name = test-model
        jobs = 1
        prestart = 1
        notebook_pages = false
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
