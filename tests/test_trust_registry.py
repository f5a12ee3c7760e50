"Trust in the registry: a model loads only from its registered skops bytes, registration is one version per model, the registry is the truth."
import json, os, shutil, subprocess, sys, textwrap, time
from pathlib import Path
import pytest

pytestmark = pytest.mark.slow  # one project built up test after test: a registered model, a bento, a served service

from conftest import run_mlnb, run_json

REGISTER = textwrap.dedent("""\
    import json, sys
    from sklearn.datasets import load_breast_cancer
    from sklearn.linear_model import LogisticRegression
    from mlnb import tracking
    X, y = load_breast_cancer(return_X_y=True, as_frame=True)
    m = LogisticRegression(C=float(sys.argv[1]), max_iter=5000).fit(X, y)
    print(json.dumps(tracking.register_model(m, X, interactive=True)))
    """)


def register(project, c="1.0", **popen):
    "Register a small model from a process of its own, as a stage would (the interactive stage context)."
    return subprocess.Popen([sys.executable, "-c", REGISTER, c], cwd=project, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def registered(project, c="1.0") -> dict:
    p = register(project, c); out, err = p.communicate(timeout=240)
    assert p.returncode == 0, err
    return json.loads(out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    "A project with two registered versions (1 champion, 2 challenger) of a small model."
    d = tmp_path_factory.mktemp("trust")
    (d / "settings.ini").write_text("[mlnb]\nmodel_name = trust-model\nexperiment = trust\ntask = binary\ntarget = target\n")
    v1, v2 = registered(d, "1.0"), registered(d, "0.1")
    from mlnb.config import load_config
    from mlnb import tracking
    cfg = load_config(d)
    tracking.set_alias(cfg, "champion", v1["version"], "test")
    tracking.set_alias(cfg, "challenger", v2["version"], "test")
    return d


def model_file(cfg, version) -> Path:
    "The model.skops of a version as the store keeps it."
    from mlnb import tracking
    with tracking._client(cfg) as client:
        mv = client.get_model_version(cfg.model_name, str(version))
        loc = client.get_logged_model(mv.source.split("/")[-1]).artifact_location
    return Path(loc.removeprefix("file://")) / "model.skops"


@pytest.fixture
def cfg(store):
    from mlnb.config import load_config
    return load_config(store)


def test_registered_digest_is_the_stored_file_and_loads(cfg):
    from mlnb import tracking
    from mlnb.stage import skops_digest
    info = tracking.model_version_info(cfg, "1")
    assert info["tags"]["mlnb.model_sha256"] == skops_digest(model_file(cfg, 1))
    assert hasattr(tracking.load_model(cfg, "champion"), "predict_proba")


@pytest.fixture
def restore(cfg):
    "Put the store's model files back after a test swaps them."
    saved = {v: model_file(cfg, v).read_bytes() for v in (1, 2)}
    mlmodel = {v: (model_file(cfg, v).parent / "MLmodel").read_text() for v in (1, 2)}
    yield
    for v in (1, 2):
        model_file(cfg, v).write_bytes(saved[v]); (model_file(cfg, v).parent / "MLmodel").write_text(mlmodel[v])
        (model_file(cfg, v).parent / "model.pkl").unlink(missing_ok=True)


def test_swapped_model_file_is_refused_and_audited(cfg, restore, store):
    from mlnb import tracking, audit
    from mlnb.errors import ModelRefused
    # the champion's file replaced by another valid model (version 2's): not what was registered
    model_file(cfg, 1).write_bytes(model_file(cfg, 2).read_bytes())
    with pytest.raises(ModelRefused, match=r"model 'trust-model' version 1: model.skops has digest \w+…, but \w+… was registered"):
        tracking.load_model(cfg, "champion")
    ev = audit.events(cfg, kind="model.refused")[-1]
    assert str(ev["refs"]["version"]) == "1" and "was registered" in ev["data"]["why"]
    # flipped bytes: refused the same way, never a zip/skops traceback
    data = bytearray(model_file(cfg, 2).read_bytes()); data[len(data) // 2: len(data) // 2 + 64] = os.urandom(64)
    model_file(cfg, 2).write_bytes(bytes(data))
    with pytest.raises(ModelRefused, match="version 2"):
        tracking.load_model(cfg, "2")


def test_a_pickle_among_the_artifacts_never_runs(cfg, restore, tmp_path):
    "The attack seen: MLmodel switched to cloudpickle with a model.pkl whose unpickling runs code."
    from mlnb import tracking
    from mlnb.errors import ModelRefused
    marker = tmp_path / "pwned"
    folder = model_file(cfg, 1).parent
    code = f"import pickle, os\nclass E:\n    def __reduce__(self): return (os.system, ('touch {marker}',))\nopen('{folder}/model.pkl','wb').write(pickle.dumps(E()))"
    subprocess.run([sys.executable, "-c", code], check=True)
    mlmodel = (folder / "MLmodel").read_text()
    (folder / "MLmodel").write_text(mlmodel.replace("serialization_format: skops", "serialization_format: cloudpickle").replace("model.skops", "model.pkl"))
    model_file(cfg, 1).unlink()
    with pytest.raises(ModelRefused, match="no model.skops.*never from a pickle"):
        tracking.load_model(cfg, "1")
    # the CLI paths that load models: promote (champion comparison) and build
    p = run_mlnb(cfg.root, "build", check=1)
    assert p.stderr.strip().splitlines()[-1].startswith("mlnb: error: model 'trust-model' version 1: no model.skops") and "Traceback" not in p.stderr
    assert not marker.exists()


def test_untrusted_types_are_refused_at_registration_with_the_setting_that_allows_them(store):
    from mlnb.tracking import check_trusted, trusted_types
    from mlnb.errors import ModelRefused
    with pytest.raises(ModelRefused, match=r"holds types nobody has reviewed: mymod.Evil; .*add `trusted_types = mymod.Evil` to settings.ini"):
        check_trusted(["sklearn.tree._tree.Tree", "mymod.Evil"], trusted_types({}))
    check_trusted(["mymod.Evil"], trusted_types({"trusted_types": "mymod.Evil, other.T"}))


def test_concurrent_registration_of_one_model_makes_one_version(store, cfg):
    from mlnb import tracking
    before = {v["version"] for v in tracking.list_versions(cfg)}
    procs = [register(store, "0.37") for _ in range(2)]
    outs = [json.loads(p.communicate(timeout=240)[0].strip().splitlines()[-1]) for p in procs]
    assert outs[0]["version"] == outs[1]["version"] and sorted(o["reused"] for o in outs) == [False, True]
    assert {v["version"] for v in tracking.list_versions(cfg)} - before == {outs[0]["version"]}


def test_no_op_alias_move_is_not_recorded(cfg):
    from mlnb import tracking, audit
    champ = tracking.read_aliases(cfg.tracking_uri, cfg.model_name)["champion"]
    hist, promoted = len(tracking.alias_history(cfg)), len(audit.events(cfg, kind="model.promoted"))
    ev = tracking.set_alias(cfg, "champion", champ, "again", kind="promote")
    assert ev["kind"] == "unchanged" and ev["seq"] is None
    assert len(tracking.alias_history(cfg)) == hist and len(audit.events(cfg, kind="model.promoted")) == promoted


def test_lineage_refs_are_names_not_paths(store, tmp_path):
    outside = tmp_path / "x" / "bentos" / "evil" / "v9" / "src"; outside.mkdir(parents=True)
    (outside / "serving.json").write_text(json.dumps({"version": 1, "bento": "evil:v9", "lineage": {"model_sha256": "forged"}}))
    rel = os.path.relpath(tmp_path / "x" / "bentos" / "evil", store / ".mlnb" / "bentoml" / "bentos")
    p = run_mlnb(store, "lineage", f"{rel}:v9", check=1)
    assert "is not a bento tag (NAME:VERSION of letters, digits" in p.stderr and "forged" not in p.stdout


def test_a_duplicate_request_id_in_the_log_is_named_not_guessed(cfg):
    from mlnb.governance import find_prediction
    from mlnb.errors import ConfigError
    d = cfg.prediction_log_dir; d.mkdir(parents=True, exist_ok=True)
    rows = [{"request_id": "dup", "ts": time.time(), "model_version": v, "variant": "champion", "features": {}, "score": 0.5} for v in (1, 2)]
    (d / "predictions-1.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    try:
        with pytest.raises(ConfigError, match="request id 'dup' names 2 logged predictions"):
            find_prediction(cfg, "dup")
    finally: shutil.rmtree(d)


def test_a_rerun_never_rewrites_a_versions_lineage_and_sync_notices_a_lost_store(project):
    from conftest import add_stage
    from mlnb.config import load_config
    from mlnb import tracking
    add_stage(project, "train", "upstream = []\nC = 1.0",
              "from sklearn.datasets import load_breast_cancer\nfrom sklearn.linear_model import LogisticRegression\n"
              "from mlnb import tracking\nX, y = load_breast_cancer(return_X_y=True, as_frame=True)\n"
              "tracking.register_model(LogisticRegression(C=C, max_iter=5000).fit(X, y), X)")
    first = run_json(project, "run", timeout=600)
    cfg = load_config(project)
    tags = tracking.model_version_info(cfg, "1")["tags"]
    assert tags["mlnb.run_id"] == first["run_id"] and tags["mlnb.parent_run_id"]
    again = run_json(project, "run", "--force", timeout=600)  # the same model again: the same version, its lineage untouched
    assert again["stages"]["train"]["status"] == "done"
    assert [v["version"] for v in tracking.list_versions(cfg)] == [1]
    assert tracking.model_version_info(cfg, "1")["tags"]["mlnb.parent_run_id"] == tags["mlnb.parent_run_id"]
    # the store is lost (a fresh mlflow.db): sync logs the runs again instead of saying they are there
    (project / ".mlnb" / "mlflow.db").unlink()
    out = run_mlnb(project, "sync", check=0).stdout
    from mlflow import MlflowClient
    tracking.watch_store(cfg.tracking_uri)  # this process had the old file open: MLflow must open the new one
    client = MlflowClient(cfg.tracking_uri)
    for line in out.strip().splitlines():
        run_id, parent = line.split()
        assert client.get_run(parent).data.tags["mlnb.run_id"] == run_id
    # and the next run does not reuse a register stage whose version the registry no longer has: it registers again
    third = run_json(project, "run", timeout=600)
    assert third["stages"]["train"]["status"] == "done"
    assert [v["version"] for v in tracking.list_versions(cfg)] == [1]
    assert tracking.model_version_info(cfg, "1")["tags"]["mlnb.run_id"] == third["run_id"]


def test_a_notebook_run_by_hand_does_not_touch_the_registry(store, cfg):
    from mlnb import tracking, audit
    before, events = tracking.list_versions(cfg), len(audit.events(cfg))
    code = REGISTER.replace(", interactive=True", "")
    p = subprocess.run([sys.executable, "-c", code, "0.77"], cwd=store, capture_output=True, text=True, timeout=240)
    assert p.returncode != 0 and "not registered: this notebook runs outside a pipeline run" in p.stderr
    assert tracking.list_versions(cfg) == before and len(audit.events(cfg)) == events


def test_data_paths_stay_in_the_project_unless_named_absolute_on_purpose(project, tmp_path_factory):
    from conftest import add_stage
    outside = tmp_path_factory.mktemp("elsewhere") / "rows.csv"
    outside.write_text("a,b\n1,2\n3,4\n")
    add_stage(project, "ingest", "upstream = []\nsource = 'data/rows.csv'",
              "from mlnb import stage, steps\ndf = steps.read_data(source)\nstage.save('rows', {'n': len(df)})")
    # a relative path that climbs out of the project is refused
    p = run_mlnb(project, "run", "-p", "source=../../etc/passwd.csv", check=1)
    assert "is outside the project" in p.stderr
    # a file that is not data is refused by its kind before anything reads it
    p = run_mlnb(project, "run", "-p", "source=/etc/passwd", check=1)
    assert "data file /etc/passwd: accepted formats are .parquet, .csv, .jsonl" in p.stderr
    # an absolute path named on purpose is read, and recorded with its digest
    rec = run_json(project, "run", "-p", f"source={outside}")
    entry = Path(rec["stages"]["ingest"]["entry"])
    assert json.loads((entry / "rows.json").read_text()) == {"n": 2}
    from mlnb.stage import file_digest
    assert json.loads((entry / "inputs.json").read_text()) == {str(outside.resolve()): {"sha256": file_digest(outside), "bytes": outside.stat().st_size, "outside_project": True}}
