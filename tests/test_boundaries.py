"Module boundaries from the style guide, checked on the generated package with `ast`."
import ast, subprocess, sys
from conftest import ROOT

PKG = ROOT / "mlnb"
OWNERS = {"mlflow": {"tracking"}, "papermill": {"pipeline"}, "bentoml": {"serving"}, "dask": {"pipeline"}, "distributed": {"pipeline"}, "fsspec": {"store"}, "feast": {"features"}}


def imports(path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import): yield from (a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0: yield node.module.split(".")[0]


def test_one_importer_per_heavy_library():
    for f in PKG.glob("*.py"):
        for lib in imports(f):
            if lib in OWNERS: assert f.stem in OWNERS[lib], f"{f.name} imports {lib}; only {OWNERS[lib]} may"


def test_import_mlnb_cli_is_light():
    code = "import sys, mlnb, mlnb.cli, mlnb.pipeline, mlnb.stage, mlnb.tracking; heavy = [m for m in ('mlflow', 'papermill', 'pandas', 'bentoml', 'sklearn', 'feast') if m in sys.modules]; print(heavy)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]", f"importing mlnb pulled in {out}"


def test_library_never_prints():
    for f in PKG.glob("*.py"):
        if f.stem == "cli": continue
        calls = [n for n in ast.walk(ast.parse(f.read_text())) if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "print"]
        assert not calls, f"{f.name} prints; only the CLI writes to the terminal"


def mlnb_imports(path):
    "Every mlnb module a module imports, at the top or inside a function."
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module: yield node.module.split(".")[0]
            elif node.level == 0 and node.module and node.module.startswith("mlnb."): yield node.module.split(".")[1]
            elif node.level == 0 and node.module == "mlnb": yield from (a.name for a in node.names)
        elif isinstance(node, ast.Import):
            yield from (a.name.split(".")[1] for a in node.names if a.name.startswith("mlnb."))


def test_imports_only_go_down():
    "A module imports only modules of lower-numbered notebooks: no circles (the audit log sits near the ground floor)."
    number = {nb.stem.split("_", 1)[1]: int(nb.stem.split("_", 1)[0]) for nb in (ROOT / "nbs").glob("[0-9][0-9]_*.ipynb")}
    for f in PKG.glob("*.py"):
        if f.stem not in number: continue
        for mod in set(mlnb_imports(f)):
            if mod in number and mod != f.stem:
                assert number[mod] < number[f.stem], f"{f.name} (notebook {number[f.stem]:02d}) imports {mod} (notebook {number[mod]:02d}): imports go down only"


def test_only_the_reference_example_uses_its_data():
    "The framework knows nothing of the card-fraud example: its columns live in the project's settings, not in mlnb."
    users = [f.name for f in PKG.glob("*.py") if f.stem != "data" and "data" in set(mlnb_imports(f))]
    assert users == [], f"{users} import mlnb.data"
    assert not [f.name for f in PKG.glob("*.py") if f.stem != "data" and "is_fraud" in f.read_text()]
