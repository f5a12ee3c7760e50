"""The `store` setting with the local executor: products and executed notebooks go to an fsspec URL (a `file://` folder
outside the project here), a second checkout of the project reuses them by cache key, what comes back is checked against its
digests, and a store that cannot be used is one line at the start of the run. (On Dask: tests/test_dask.py.)"""
import json, shutil
from pathlib import Path
import pytest

from conftest import free_port, run_json, run_mlnb, statuses

pytestmark = pytest.mark.slow


def checkout(src, dest, store=None):
    "A copy of the project's files (no `.mlnb`): what a teammate's clone holds."
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copytree(src / "pipeline", dest / "pipeline")
    ini = "\n".join(l for l in (src / "settings.ini").read_text().splitlines() if not l.startswith("store ="))
    (dest / "settings.ini").write_text(ini + (f"\nstore = {store}\n" if store else "\n"))
    return dest


def test_a_second_checkout_reuses_the_products_in_the_store(chain, tmp_path_factory):
    store = tmp_path_factory.mktemp("store")
    with open(chain / "settings.ini", "a") as f: f.write(f"store = {store.as_uri()}\n")
    first = run_json(chain, "run")
    assert statuses(first) == {"a": "done", "b": "done", "c": "done"}
    keys = {n: s["key"] for n, s in first["stages"].items()}
    for n, k in keys.items():  # the store has each entry, as the state folder has it, and the run's executed notebooks
        man = json.loads((store / "cache" / n / k / "manifest.json").read_text())
        assert man["key"] == k and set(man["files"]) >= {"products.json", "notebook.ipynb"}
        for rel, rec in man["files"].items(): assert (store / "cache" / n / k / rel).stat().st_size == rec["bytes"]
        assert (store / "runs" / first["run_id"] / "notebooks" / f"{n}.ipynb").is_file()
    assert first["settings"]["store"] == store.as_uri()
    rep = run_json(chain, "reproduce", first["run_id"])  # a reproduction reruns every stage: the store does not hand back what the run made
    assert rep["matched"] and {s["stage"]: s["status"] for s in rep["stages"]} == {"a": "done", "b": "done", "c": "done"}, rep

    second = checkout(chain, tmp_path_factory.mktemp("teammate"), store.as_uri())
    rec = run_json(second, "run")  # nothing of the first checkout's .mlnb: every product comes from the store
    assert statuses(rec) == {"a": "cached", "b": "cached", "c": "cached"}
    assert {n: s["key"] for n, s in rec["stages"].items()} == keys
    assert json.loads((Path(rec["stages"]["c"]["entry"]) / "out.json").read_text()) == {"y": 7}
    assert Path(rec["stages"]["c"]["entry"]).is_relative_to(second / ".mlnb" / "cache"), "a checked copy, where `mlnb show` reads"
    shown = run_mlnb(second, "show", rec["run_id"], check=0).stdout
    assert "c: reused" in shown and "out (json" in shown
    assert (second / rec["stages"]["c"]["visible_notebook"]).is_file(), "the executed notebook opens, as after a local run"

    plain = checkout(chain, tmp_path_factory.mktemp("no-store"))  # the cache keys do not depend on the store
    alone = run_json(plain, "run")
    assert {n: s["key"] for n, s in alone["stages"].items()} == keys and statuses(alone) == {"a": "done", "b": "done", "c": "done"}

    # bytes that changed in the store are not used: the stage runs again and the run says why
    (store / "cache" / "c" / keys["c"] / "out.json").write_text('{"y": 1000}')
    third = checkout(chain, tmp_path_factory.mktemp("third"), store.as_uri())
    rec = run_json(third, "run")
    assert statuses(rec) == {"a": "cached", "b": "cached", "c": "done"}
    assert any("does not match the size and SHA-256 its manifest records" in m for m in rec["stages"]["c"]["notes"]), rec["stages"]["c"]
    assert json.loads((Path(rec["stages"]["c"]["entry"]) / "out.json").read_text()) == {"y": 7}


def test_a_store_that_cannot_be_used_is_one_line_at_the_start(chain, tmp_path):
    accepted = "accepted: an empty value (the project's state folder), an absolute path or file:///ABSOLUTE/PATH"
    def error(url, *args):
        p = run_mlnb(chain, "run", *args, env={"MLNB_STORE": url}, check=1)
        lines = [l for l in p.stderr.splitlines() if l.strip()]
        assert len(lines) == 1 and lines[0].startswith("mlnb: error: ") and "Traceback" not in p.stderr, p.stderr
        return lines[0]
    assert "store = nosuch://bucket/x: fsspec does not know this protocol" in error("nosuch://bucket/x") and accepted in error("nosuch://bucket/x")
    try: import s3fs  # noqa: F401
    except ImportError:  # fsspec knows s3://, its implementation is not installed here
        assert "store = s3://bucket/prefix: Install s3fs to access S3; " + accepted in error("s3://bucket/prefix")
    port = free_port()  # nothing listens there; the password never shows
    msg = error(f"ftp://alice:s3cret@127.0.0.1:{port}/x")
    assert f"cannot use the store ftp://alice:***@127.0.0.1:{port}/x (setting store): ConnectionRefusedError" in msg and "s3cret" not in msg
    assert "cannot use the store file:///dev/null/x (setting store): NotADirectoryError" in error("file:///dev/null/x")
    assert "store = 'relative/folder' is a relative path; " + accepted in error("relative/folder")
    assert "store = memory://x lives in this process only, so no Dask worker reaches it" in error("memory://x", "--scheduler", f"tcp://127.0.0.1:{port}")
    assert not (chain / ".mlnb" / "cache").exists(), "nothing ran"
