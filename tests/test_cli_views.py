"status, show and inspect: what a person and a machine read about runs and stages."
import pytest
from conftest import run_json, run_mlnb


@pytest.mark.slow
def test_status_show_inspect(chain):
    assert "no runs yet" in run_mlnb(chain, "status", check=0).stdout
    first = run_json(chain, "run")
    second = run_json(chain, "run", "-p", "factor=3")
    st = run_json(chain, "status")
    assert [r["run_id"] for r in st["runs"]] == [second["run_id"], first["run_id"]]
    assert st["runs"][0]["ran"] == 2 and st["runs"][0]["reused"] == 1
    text = run_mlnb(chain, "status", check=0).stdout
    assert second["run_id"] in text and "  a              reused" in text and "done" in text  # as `mlnb run` says it

    shown = run_json(chain, "show", first["run_id"])
    assert shown["stages"]["a"]["metrics"] == {"n": 3.0}
    text = run_mlnb(chain, "show", first["run_id"], check=0).stdout
    assert "metrics   n=3" in text and "product   out (json" in text
    assert f"notebook  runs/{first['run_id']}/a.ipynb" in text  # the path JupyterLab opens, relative to the project
    big = run_json(chain, "run", "-p", "n=20000")  # a count reads as a count, not 2e+04
    assert "metrics   n=20000\n" in run_mlnb(chain, "show", check=0).stdout and big["run_id"] in run_mlnb(chain, "show", check=0).stdout
    assert "no run 'nope'" in run_mlnb(chain, "show", "nope", check=1).stderr

    info = run_json(chain, "inspect", "b")
    assert info["upstream"] == ["a"] and info["downstream"] == ["c"]
    assert info["parameters"] == {"factor": {"default": 2, "type": "int"}}
    assert "factor" in run_mlnb(chain, "inspect", "b", check=0).stdout
