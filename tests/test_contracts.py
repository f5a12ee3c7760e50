"`mlnb contract`: inferred ranges a person agrees with, widened only on purpose; columns left out by option or by the contract."
import math
import pytest
from pathlib import Path
import pandas as pd
import yaml
from conftest import ROOT, reference_project, run_json, run_mlnb

from mlnb.data import generate_transactions, FEATURES


def ranges(path):
    cols = yaml.safe_load(Path(path).read_text())["columns"]
    return {c: (v.get("greater_than_or_equal_to"), v.get("less_than_or_equal_to")) for c, v in cols.items() if "less_than_or_equal_to" in v}


def test_infer_writes_the_observed_ranges_and_says_how_to_widen_them(project, tmp_path):
    df = generate_transactions(3000, seed=4)[FEATURES]
    df.to_parquet(tmp_path / "tx.parquet")
    p = run_mlnb(project, "contract", "infer", str(tmp_path / "tx.parquet"), str(tmp_path / "c.yaml"), check=0)
    r = ranges(tmp_path / "c.yaml")
    assert r["hour"] == (0, 23) and isinstance(r["hour"][1], int)  # integers stay integers
    assert r["amount"] == (float(df.amount.min()), float(df.amount.max())) and r["amount"][0] > 0  # not 0: never observed
    assert p.stderr.strip() == ("numeric ranges are the observed minimum to maximum; widen them with --margin 0.1 (10% of each span) "
                                "or --bounds COL=LO:HI")
    # widened on purpose: a fraction of the span on both sides, not below 0 for data never negative; a domain range as given
    p = run_mlnb(project, "contract", "infer", str(tmp_path / "tx.parquet"), str(tmp_path / "w.yaml"), "--margin", "0.1",
                 "--bounds", "n_tx_24h=0:50", "--bounds", "amount=0:", check=0)
    w = ranges(tmp_path / "w.yaml")
    assert w["hour"] == (0, 26) and w["n_tx_24h"] == (0, 50)
    lo, hi = df.account_age_days.min(), df.account_age_days.max()
    assert w["account_age_days"] == (max(0, math.floor(lo - 0.1 * (hi - lo))), math.ceil(hi + 0.1 * (hi - lo)))
    assert w["amount"][0] == 0 and w["amount"][1] >= df.amount.max() + 0.1 * (df.amount.max() - df.amount.min()) - 1e-4
    assert "widened by 0.1 of each span" in p.stderr and "(n_tx_24h=0:50, amount=0: as given)" in p.stderr
    # the data passes its own contract either way
    for c in ("c.yaml", "w.yaml"):
        assert "3000 rows: ok" in run_mlnb(project, "contract", "check", str(tmp_path / "tx.parquet"), str(tmp_path / c), check=0).stdout
    bad = run_mlnb(project, "contract", "infer", str(tmp_path / "tx.parquet"), str(tmp_path / "x.yaml"), "--bounds", "channel=0:1", check=1)
    assert "bounds for 'channel': not a numeric column of the data; numeric columns: amount, hour" in bad.stderr
    assert "expected COL=LO:HI, e.g. hour=0:23" in run_mlnb(project, "contract", "infer", str(tmp_path / "tx.parquet"), str(tmp_path / "x.yaml"),
                                                             "--bounds", "hour", check=2).stderr


def test_a_scikit_learn_table_gets_the_ages_it_has(project, tmp_path):
    from sklearn.datasets import load_diabetes
    df = load_diabetes(as_frame=True, scaled=False).frame
    df.to_csv(tmp_path / "diabetes.csv", index=False)
    run_mlnb(project, "contract", "infer", str(tmp_path / "diabetes.csv"), str(tmp_path / "d.yaml"), check=0)
    assert ranges(tmp_path / "d.yaml")["age"] == (df.age.min(), df.age.max()) == (19.0, 79.0)


@pytest.mark.slow
def test_check_leaves_out_columns_by_option_or_by_the_contract(tmp_path):
    d = reference_project(tmp_path / "proj")
    run_json(d, "run", "--only", "ingest", timeout=600)
    rec = run_json(d, "run", "--only", "examples", timeout=600)  # the transactions with their account features from the store
    examples = pd.read_parquet(Path(rec["stages"]["examples"]["entry"]) / "examples.parquet")
    assert {"tx_id", "account_id", "event_timestamp"} <= set(examples.columns)
    product = tmp_path / "examples.parquet"  # with one id column left of the three settings.ini declares
    examples.drop(columns=["account_id", "event_timestamp"]).to_parquet(product)
    contract = d / "nbs/pipeline/contract.yaml"
    assert contract.read_text() == (ROOT / "nbs/pipeline/contract.yaml").read_text()  # the reviewed file, not re-inferred
    # the pipeline's own product against its own contract: the id column is named, with the two ways to leave it out
    p = run_mlnb(d, "contract", "check", str(product), str(contract), check=1)
    assert "column tx_id not in the contract" in p.stdout
    assert p.stderr.strip() == (f"mlnb: error: 1 contract check(s) failed; tx_id is not in the contract: leave it out with --exclude tx_id, "
                                f"or list it under ignore_columns in {contract}")
    assert run_mlnb(d, "contract", "check", str(product), str(contract), "--exclude", "tx_id", check=0).stdout.startswith("20000 rows: ok")
    # declared in the contract: checks pass with or without the column
    (tmp_path / "c.yaml").write_text(contract.read_text() + "ignore_columns:\n- tx_id\n")
    assert "rows: ok" in run_mlnb(d, "contract", "check", str(product), str(tmp_path / "c.yaml"), check=0).stdout
    pd.read_parquet(product).drop(columns="tx_id").to_parquet(tmp_path / "noid.parquet")
    assert "rows: ok" in run_mlnb(d, "contract", "check", str(tmp_path / "noid.parquet"), str(tmp_path / "c.yaml"), check=0).stdout
    # infer --exclude writes that declaration
    run_mlnb(d, "contract", "infer", str(product), str(tmp_path / "i.yaml"), "--exclude", "tx_id", check=0)
    assert yaml.safe_load((tmp_path / "i.yaml").read_text())["ignore_columns"] == ["tx_id"]
    assert "rows: ok" in run_mlnb(d, "contract", "check", str(product), str(tmp_path / "i.yaml"), check=0).stdout
    # the pipeline still validates against the reviewed contract
    assert run_json(d, "run", "--only", "validate", timeout=600)["stages"]["validate"]["status"] == "done"
