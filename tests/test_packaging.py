"""Installing segdistill into an existing detectron2 environment: pyproject.toml declares every
runtime dependency (the same list as requirements.txt, which tools/setup_env.sh installs), the
declared versions resolve in this environment, every third-party module the package and its
tools import is declared (or is torch / torchvision / detectron2, documented instead), a missing
dependency is an ImportError that says what to install, and importing the package leaves the
warning filters alone."""
import ast
import glob
import importlib.metadata as md
import os
import re
import subprocess
import sys

import pytest

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
from packaging.requirements import Requirement  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UNDECLARED = {"torch", "torchvision", "detectron2"}  # documented in pyproject.toml, installed first


def canon(name):
    return re.sub(r"[-_.]+", "-", name).lower()


def pyproject():
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


def requirements_txt():
    with open(os.path.join(REPO, "requirements.txt")) as f:
        lines = [line.split("#")[0].strip() for line in f]
    return [Requirement(line) for line in lines if line]


def spec_map(reqs):
    return {canon(r.name): str(r.specifier) for r in reqs}


def test_pyproject_declares_what_requirements_txt_installs():
    project = pyproject()["project"]
    runtime = spec_map(Requirement(r) for r in project["dependencies"])
    test_extra = spec_map(Requirement(r) for r in project["optional-dependencies"]["test"])
    reqs = spec_map(requirements_txt())
    assert "pytest" in test_extra and "pytest" not in runtime
    assert set(test_extra) <= set(reqs), "the [test] extra must be installed by requirements.txt too"
    assert runtime == {k: v for k, v in reqs.items() if k not in test_extra}, (
        "pyproject.toml's dependencies and requirements.txt (less the test extra) differ")
    assert not UNDECLARED & set(runtime), "torch, torchvision and detectron2 are documented, not declared"
    text = open(os.path.join(REPO, "pyproject.toml")).read()
    for name in UNDECLARED:
        assert name in text, f"pyproject.toml must say how to install {name}"


def test_declared_dependencies_resolve_here():
    """What `pip install .` would have to satisfy is satisfied by this environment's versions."""
    project = pyproject()["project"]
    for line in project["dependencies"] + project["optional-dependencies"]["test"]:
        req = Requirement(line)
        try:
            version = md.version(req.name)
        except md.PackageNotFoundError:
            pytest.fail(f"declared dependency {req.name!r} is not installed in this environment")
        assert req.specifier.contains(version, prereleases=True), f"{req.name} {version} does not satisfy {req}"


def third_party_imports(paths):
    """{top-level module: first file importing it} of absolute imports outside the stdlib."""
    found = {}
    for path in paths:
        with open(path) as f:
            tree = ast.parse(f.read(), path)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top not in ("segdistill", "__future__"):
                    found.setdefault(top, os.path.relpath(path, REPO))
    return found


def test_every_imported_module_is_declared():
    paths = (glob.glob(os.path.join(REPO, "projects", "segdistill", "**", "*.py"), recursive=True)
             + glob.glob(os.path.join(REPO, "tools", "*.py")) + [os.path.join(REPO, "train_net.py")])
    imports = third_party_imports(paths)
    assert {"torch", "detectron2", "timm", "numpy"} <= set(imports)  # the scan sees the package
    project = pyproject()["project"]
    declared = {canon(Requirement(r).name) for r in project["dependencies"]}
    # a tool's optional extra (onnx for tools/export_model.py): imported by the module's own name,
    # and its absence is that tool's error naming the extra, so it need not be installed here
    optional = {canon(Requirement(r).name) for extra, reqs in project["optional-dependencies"].items()
                if extra != "test" for r in reqs}
    providers = md.packages_distributions()  # import name -> distributions that install it
    missing = {}
    for module, where in sorted(imports.items()):
        if module in UNDECLARED or (canon(module) in optional and where.startswith("tools")):
            continue
        dists = {canon(d) for d in providers.get(module, [])}
        if not dists & declared:
            missing[module] = (where, sorted(dists))
    assert not missing, f"imported but not declared in pyproject.toml (module: (file, distributions)): {missing}"


def run_python(code, *flags):
    env = dict(os.environ, PYTHONPATH=os.path.join(REPO, "projects"))
    return subprocess.run([sys.executable, *flags, "-c", code], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=300)


@pytest.mark.parametrize("module", ["detectron2", "timm"])
def test_missing_dependency_says_what_to_install(module):
    res = run_python(f"import sys; sys.modules[{module!r}] = None; import segdistill")
    assert res.returncode != 0
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: segdistill needs the module"), res.stderr[-2000:]
    assert repr(module) in last and "pip install" in last and "setup_env.sh" in last
    if module == "detectron2":
        assert "after torch" in last and "detectron2.git" in last
    else:
        assert "pyproject.toml" in last and "requirements.txt" in last


def test_import_leaves_warning_filters_alone():
    code = ("import warnings; before = list(warnings.filters); import segdistill; "
            "assert warnings.filters == before, [f for f in warnings.filters if f not in before]; print('ok')")
    res = run_python(code, "-W", "default")
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-2000:]
    # and detectron2's import-time deprecation warnings are still kept out of the user's log
    assert "torch.jit.script" not in res.stderr, res.stderr[-2000:]
