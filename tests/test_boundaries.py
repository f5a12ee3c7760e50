"Module boundaries from the style guide, checked on the generated package with `ast`."
import ast, subprocess, sys
from conftest import ROOT

PKG = ROOT / "mlnb"
OWNERS = {"mlflow": {"tracking"}, "papermill": {"pipeline"}, "bentoml": {"serving"}, "dask": {"pipeline"}, "distributed": {"pipeline"}}


def imports(path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import): yield from (a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0: yield node.module.split(".")[0]


def test_one_importer_per_heavy_library():
    for f in PKG.glob("*.py"):
        for lib in imports(f):
            if lib in OWNERS: assert f.stem in OWNERS[lib], f"{f.name} imports {lib}; only {OWNERS[lib]} may"


def test_import_mlnb_cli_is_light():
    code = "import sys, mlnb, mlnb.cli, mlnb.pipeline, mlnb.stage, mlnb.tracking; heavy = [m for m in ('mlflow', 'papermill', 'pandas', 'bentoml', 'sklearn') if m in sys.modules]; print(heavy)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]", f"importing mlnb pulled in {out}"


def test_library_never_prints():
    for f in PKG.glob("*.py"):
        if f.stem == "cli": continue
        calls = [n for n in ast.walk(ast.parse(f.read_text())) if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "print"]
        assert not calls, f"{f.name} prints; only the CLI writes to the terminal"
