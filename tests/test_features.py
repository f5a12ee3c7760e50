"The feature store through the real CLI and the real pipeline: Feast definitions from a notebook, online lookups, cache keys."
import json, time
from datetime import datetime, timezone
import pandas as pd
import pytest
from conftest import add_stage, run_json, run_mlnb, statuses

VIEW = ('account_stats = FeatureView(name="account_stats", entities=[account], ttl=timedelta(days=30),\n'
        '    schema=[Field(name="n_tx_24h", dtype=Int64), Field(name="usual_amount", dtype=Float64)],\n'
        '    source=FileSource(path="data/account_stats.parquet", timestamp_field="ts"))')


def write_definitions(project, *cells):
    cells = ["from datetime import timedelta\nfrom feast import Entity, FeatureView, Field, FileSource, ValueType\nfrom feast.types import Float64, Int64",
             'account = Entity(name="account", join_keys=["account_id"], value_type=ValueType.INT64)', *cells]
    nb = {"cells": [{"cell_type": "code", "execution_count": None, "id": f"c{i}", "metadata": {}, "outputs": [], "source": s} for i, s in enumerate(cells)],
          "metadata": {}, "nbformat": 4, "nbformat_minor": 5}
    (project / "nbs").mkdir(exist_ok=True)
    (project / "nbs/features.ipynb").write_text(json.dumps(nb, indent=1))


@pytest.fixture
def store_project(project):
    (project / "data").mkdir()
    pd.DataFrame({"account_id": [1, 1, 2], "ts": pd.to_datetime(["2026-01-01", "2026-01-10", "2026-01-05"], utc=True),
                  "n_tx_24h": [3, 99, 7], "usual_amount": [10.0, 50.0, 20.0]}).to_parquet(project / "data/account_stats.parquet")
    write_definitions(project, VIEW)
    return project


def cli(project, *args, check=None, env=None):
    "`mlnb --project PROJECT ARGS` through the real CLI in this process (click's runner): exit code, stdout and stderr as a process has them."
    from types import SimpleNamespace
    from click.testing import CliRunner
    from mlnb.cli import main
    r = CliRunner().invoke(main, ["--project", str(project), *args], env=env, catch_exceptions=False)
    if check is not None: assert r.exit_code == check, f"exit {r.exit_code} (wanted {check})\nstdout:\n{r.stdout}\nstderr:\n{r.stderr}"
    return SimpleNamespace(returncode=r.exit_code, stdout=r.stdout, stderr=r.stderr)


def cli_json(project, *args, **kw):
    return json.loads(cli(project, *args, "--json", check=0, **kw).stdout)


def error_line(p):
    lines = [l for l in p.stderr.splitlines() if l.strip()]
    assert lines and lines[-1].startswith("mlnb: error: ") and "Traceback" not in p.stderr, p.stderr
    return lines[-1]


def test_cli_apply_materialize_get(store_project):
    "The real CLI in this process (feast, 4 s to import, is imported once: the commands' own cost is what is left)."
    p = store_project
    views = cli_json(p, "features", "list")  # applies the definitions first
    assert [(v["name"], v["entities"], v["features"], v["materialized_until"]) for v in views] == [("account_stats", ["account_id"], ["n_tx_24h", "usual_amount"], None)]
    assert (p / ".mlnb/features/registry.db").is_file()
    # before materialization the online store knows nobody; with feature_max_age set, a view never materialized is stale
    assert "no features for account_id=1" in error_line(cli(p, "features", "get", "account_id=1", check=1))
    stale = cli(p, "features", "freshness", env={"MLNB_FEATURE_MAX_AGE": "3600"}, check=3).stdout
    assert "feature view account_stats: never materialized; STALE: older than feature_max_age = 3600 s" in stale, stale
    # up to Jan 7: account 1's newest value is the one of Jan 1, not Jan 10's
    out = cli_json(p, "features", "materialize", "--end", "2026-01-07")  # more than a ttl ago: the first load still starts at the beginning
    assert out["views"] == ["account_stats"] and out["end"].startswith("2026-01-07")
    assert cli_json(p, "features", "get", "account_id=1") == {"account_id": 1, "n_tx_24h": 3, "usual_amount": 10.0}
    assert cli_json(p, "features", "materialize", "--end", "2026-01-05")["up_to_date"] == ["account_stats"]
    # freshness: until Jan 7, so older than an hour (exit 3, as a drift alert) but not than a thousand years
    [row] = json.loads(cli(p, "features", "freshness", "--max-age", "3600", "--json", check=3).stdout)
    assert row["view"] == "account_stats" and row["materialized_until"].startswith("2026-01-07") and row["stale"]
    assert abs(row["age_seconds"] - (time.time() - datetime(2026, 1, 7, tzinfo=timezone.utc).timestamp())) < 600, row
    assert "(STALE" not in cli(p, "features", "freshness", "--max-age", "3e10", check=0).stdout
    cli_json(p, "features", "materialize", "--end", "2026-02-01")
    assert cli_json(p, "features", "get", "account_id=1") == {"account_id": 1, "n_tx_24h": 99, "usual_amount": 50.0}
    assert cli_json(p, "features", "get", "account_id=2", "--feature", "account_stats:n_tx_24h") == {"account_id": 2, "n_tx_24h": 7}
    # skew: what the online store serves equals what training would get at that time; until the source changes under it
    assert "online = offline for 2 sampled entities" in cli(p, "features", "skew", check=0).stdout
    pd.DataFrame({"account_id": [1, 1, 2], "ts": pd.to_datetime(["2026-01-01", "2026-01-10", "2026-01-05"], utc=True),
                  "n_tx_24h": [3, 98, 7], "usual_amount": [10.0, 50.0, 20.0]}).to_parquet(p / "data/account_stats.parquet")  # a late correction
    [r] = json.loads(cli(p, "features", "skew", "--json", check=3).stdout)
    assert r["sampled"] == 2 and r["mismatches"] == [{"account_id": 1, "feature": "n_tx_24h", "offline": 98, "online": 99}], r
    # unknown entity, key, view, feature, time: one line naming it and what exists
    assert "no features for account_id=5" in error_line(cli(p, "features", "get", "account_id=5", check=1))
    assert "no entity key 'acount_id'; entity keys: account_id" in error_line(cli(p, "features", "get", "acount_id=1", check=1))
    assert "no feature view 'x'; feature views: account_stats" in error_line(cli(p, "features", "materialize", "--view", "x", check=1))
    assert "is not a time; accepted: ISO 8601" in error_line(cli(p, "features", "materialize", "--end", "yesterday", check=1))
    assert "expected KEY=VALUE" in cli(p, "features", "get", "account_id", check=2).stderr
    # a renamed view replaces the old one in the store
    write_definitions(p, VIEW.replace('name="account_stats"', 'name="account_profile"'))
    out = cli_json(p, "features", "apply")
    assert out["feature_views"] == ["account_profile"] and out["removed"] == ["account_stats"]


def test_cli_broken_definitions(project):
    assert "nbs/features.ipynb is missing (settings.ini feature_definitions names" in error_line(run_mlnb(project, "features", "list", check=1))
    write_definitions(project, "x = 1 / 0")
    assert "features.ipynb: code cell 3 failed: ZeroDivisionError" in error_line(run_mlnb(project, "features", "apply", check=1))
    # Feast's own type checks of a definition's arguments (typeguard's), though the process imported Feast without them first
    write_definitions(project, VIEW.replace("ttl=timedelta(days=30)", "ttl=30"))
    assert 'features.ipynb: code cell 3 failed: TypeCheckError: argument "ttl" (int)' in error_line(cli(project, "features", "apply", check=1))


READER = """
import sys, warnings
from mlnb import features
from mlnb.config import load_config
cfg = load_config(sys.argv[1])
assert features.online_features(cfg, {"account_id": 1}) == {"account_id": 1, "n_tx_24h": 99, "usual_amount": 50.0}
from feast import FeatureView, FileSource
deferred = {c for c, _ in features._UNCHECKED}
assert FeatureView in deferred and FileSource in deferred, deferred  # a process that only reads the store never instruments them
FileSource(path=3, timestamp_field="ts")  # so a wrong argument passes here,
features.load_definitions(cfg)  # until code that makes definitions runs: the classes it names are checked from then on
deferred = {c.__name__ for c, _ in features._UNCHECKED}
assert not deferred & {"Entity", "Field", "FeatureView", "FileSource", "DataSource"} and "OnDemandFeatureView" in deferred, deferred
try: FileSource(path=3, timestamp_field="ts")
except Exception as e: print(type(e).__name__, e)
"""


def test_a_process_that_only_reads_the_store_skips_feasts_type_checks_until_definitions_run(store_project):
    """typeguard instruments each of Feast's classes by compiling its module once per method (~2.5 s of Feast's ~3.2 s import):
    a service's worker or `mlnb monitor` only reads the store, so the checks are instrumented only when definitions run, for
    the classes they name (and their bases)."""
    import subprocess, sys
    cli_json(store_project, "features", "materialize", "--end", "2026-02-01")
    p = subprocess.run([sys.executable, "-W", "ignore", "-c", READER, str(store_project)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith('TypeCheckError argument "path" (int) is not an instance of str'), p.stdout


@pytest.mark.slow
def test_definition_change_reruns_only_the_stages_that_read_the_store(store_project):
    p = store_project
    add_stage(p, "events", "upstream = []",
              "import pandas as pd\nfrom mlnb import stage\n"
              "stage.save('events', pd.DataFrame({'account_id': [1, 1, 2], 'label': [0, 1, 0], "
              "'event_timestamp': pd.to_datetime(['2026-01-05', '2026-01-11', '2026-01-06'], utc=True)}))")
    add_stage(p, "train", "upstream = ['events']",
              "from mlnb import features, stage\n"
              "df = features.training_frame(stage.load('events'), ['account_stats'])\n"
              "stage.save('train', df)\nstage.log_metric('n_tx_sum', float(df['n_tx_24h'].sum()))")
    rec = run_json(p, "run")
    assert statuses(rec) == {"events": "done", "train": "done"}
    assert run_json(p, "show")["stages"]["train"]["metrics"]["n_tx_sum"] == 3 + 99 + 7  # each event sees the value of its time
    assert statuses(run_json(p, "run")) == {"events": "cached", "train": "cached"}
    # a changed definition reruns the stage that reads the store, not the others
    write_definitions(p, VIEW.replace("days=30", "days=3"))
    rec = run_json(p, "run")
    assert statuses(rec) == {"events": "cached", "train": "done"}
    assert run_json(p, "show")["stages"]["train"]["metrics"]["n_tx_sum"] == 99 + 7  # with a 3-day ttl, Jan 1's value is too old for Jan 5


APPLIER = """
import json, sys
from mlnb.config import load_config
from mlnb import features
sys.stdin.read(1)  # every process starts at once
cfg = load_config(sys.argv[1])
done = features.apply_definitions(cfg, changed_only=True)
print(json.dumps({"by": done["applied_by"], "views": [v["name"] for v in features.list_views(cfg)]}))
"""


def test_processes_that_find_changed_definitions_apply_them_once(store_project):
    """Parallel stages that read the store after a definition changed each find it unapplied: one applies it, under the
    store's lock, and the others find it applied (Feast's registry is rewritten whole: two writers at once would lose one)."""
    import subprocess, sys
    from mlnb.config import load_config
    from mlnb import features
    p = store_project
    first = features.apply_definitions(load_config(p))
    write_definitions(p, VIEW, VIEW.replace("account_stats", "account_more").replace('Field(name="n_tx_24h", dtype=Int64), ', ""))
    procs = [subprocess.Popen([sys.executable, "-c", APPLIER, str(p)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(3)]
    for q in procs: q.stdin.write("go"); q.stdin.flush()
    outs = []
    for q in procs:
        out, err = q.communicate(timeout=300)
        assert q.returncode == 0, err
        outs.append(json.loads(out))
    assert len({o["by"] for o in outs}) == 1 and outs[0]["by"] != first["applied_by"], outs  # applied once, by one of them
    assert all(o["views"] == ["account_more", "account_stats"] for o in outs), outs


def test_feast_leaves_the_processes_warning_filters_alone(store_project):
    """Feast's modules call `warnings.simplefilter("once", DeprecationWarning)` on import, which would make every library's
    deprecations print in `mlnb build` and in stages; mlnb imports it so the process's filters stay as they were."""
    import subprocess, sys
    code = ("import warnings, json\nbefore = [str(f) for f in warnings.filters]\nfrom mlnb.config import load_config\nfrom mlnb import features\n"
            "cfg = load_config(__import__('sys').argv[1])\nfeatures.list_views(cfg)\nimport feast, feast.feature_store\n"
            "print(json.dumps([str(f) for f in warnings.filters if str(f) not in before and f[0] != 'ignore' and f[1] is None and f[2] is DeprecationWarning]))")
    p = subprocess.run([sys.executable, "-c", code, str(store_project)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout) == [], p.stdout


def test_unknown_entities_get_the_defaults_the_definitions_declare(store_project, tmp_path):
    """`unknown_entity = default`: a served record whose entity the online store does not know gets each feature's default,
    declared with the feature in the definitions (a `mlnb.default` tag on its Field); a known entity gets its values, and a
    build refuses the setting while a served feature declares no default."""
    from mlnb.config import load_config
    from mlnb.errors import ConfigError, NotFound
    from mlnb import features
    p = store_project
    fields = {"n_tx_24h": {}, "usual_amount": {}, "amount": {}}
    write_definitions(p, VIEW.replace('dtype=Int64)', 'dtype=Int64, tags={"mlnb.default": "0"})'))
    (p / "settings.ini").write_text((p / "settings.ini").read_text() + "unknown_entity = default\n")
    cfg = load_config(p)
    with pytest.raises(ConfigError, match=r"unknown_entity = default, but no default is declared for account_stats:usual_amount"):
        features.serving_spec(cfg, fields, tmp_path)
    write_definitions(p, VIEW.replace('dtype=Int64)', 'dtype=Int64, tags={"mlnb.default": "0"})')
                             .replace('dtype=Float64)', 'dtype=Float64, tags={"mlnb.default": "12.5"})'))
    features.materialize(cfg, end="2026-02-01")
    spec = features.serving_spec(cfg, fields, tmp_path)
    assert spec["unknown_entity"] == "default" and spec["views"][0]["defaults"] == {"n_tx_24h": 0, "usual_amount": 12.5}
    lookup = features.OnlineLookup(spec, tmp_path)
    got = lookup([{"account_id": 1, "amount": 3.0}, {"account_id": 404, "amount": 4.0}])
    assert got == [{"account_id": 1, "amount": 3.0, "n_tx_24h": 99, "usual_amount": 50.0},
                   {"account_id": 404, "amount": 4.0, "n_tx_24h": 0, "usual_amount": 12.5}]
    (p / "settings.ini").write_text((p / "settings.ini").read_text().replace("unknown_entity = default", "unknown_entity = refuse"))
    refuse = features.OnlineLookup(features.serving_spec(load_config(p), fields, tmp_path), tmp_path)
    with pytest.raises(NotFound, match="account_id=404"):
        refuse([{"account_id": 404, "amount": 4.0}])
