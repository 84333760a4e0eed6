"""Loading weights never runs code (DESIGN.md, Reliability principles): every module of the package is
read with ``ast`` and any loader that can unpickle or execute code fails the test with ``file:line``.

What is flagged, and why:

- ``import pickle`` (and ``cPickle``, ``_pickle``, ``dill``, ``cloudpickle``, ``shelve``), anywhere, also via
  ``importlib.import_module``/``__import__``: unpickling runs whatever callables the data names.
- ``torch.load(...)`` unless ``weights_only=True`` is passed as a literal keyword (the default changed
  across torch versions, and ``weights_only=False`` is a full unpickler).
- ``np.load(...)`` unless ``allow_pickle=False`` is passed as a literal keyword (object arrays unpickle).
- ``yaml.load``/``yaml.load_all`` unless the loader is ``SafeLoader``/``CSafeLoader``/``BaseLoader``;
  ``yaml.unsafe_load``, ``yaml.full_load`` (and their ``_all`` forms) always: they build Python objects
  named by the document. ``yaml.safe_load`` is fine.
- ``pickle.load/loads``, ``pandas.read_pickle``, ``joblib.load``, ``marshal.load/loads``: unpicklers (or
  code-object loaders) with no safe mode.
- ``torch.jit.load``: a TorchScript archive is a program (its code is deserialized and is what runs when
  the module is called), and it has no weights-only mode; ``torch.package`` imports pickle archives and
  ``torch.hub.load`` executes a repository's ``hubconf.py``.

Names are resolved through the file's imports (``import numpy as np``, ``from torch import load``), and
a conditionally safe loader referenced without being called (``f = torch.load``) is flagged too: its
arguments cannot be checked there, so aliasing cannot hide an unsafe call.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "sensorium"

PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "shelve", "torch.package"}
ALWAYS_UNSAFE = {
    "pickle.load": "pickle.load unpickles",
    "pickle.loads": "pickle.loads unpickles",
    "pandas.read_pickle": "pandas.read_pickle unpickles",
    "joblib.load": "joblib.load unpickles",
    "marshal.load": "marshal.load reads code objects",
    "marshal.loads": "marshal.loads reads code objects",
    "torch.jit.load": "torch.jit.load loads a TorchScript program (no weights-only mode)",
    "torch.hub.load": "torch.hub.load runs the repository's hubconf.py",
    "yaml.unsafe_load": "yaml.unsafe_load builds arbitrary Python objects",
    "yaml.unsafe_load_all": "yaml.unsafe_load_all builds arbitrary Python objects",
    "yaml.full_load": "yaml.full_load is not the safe loader (use yaml.safe_load)",
    "yaml.full_load_all": "yaml.full_load_all is not the safe loader (use yaml.safe_load_all)",
}
CONDITIONAL = {"torch.load", "numpy.load", "yaml.load", "yaml.load_all"}
CANONICAL = {"torch.serialization.load": "torch.load", "numpy.lib.npyio.load": "numpy.load"}
SAFE_YAML_LOADERS = {"yaml.SafeLoader", "yaml.CSafeLoader", "yaml.BaseLoader", "yaml.CBaseLoader"}


def _import_aliases(tree: ast.AST) -> dict[str, set[str]]:
    """Local name → the dotted names it may stand for, from every import in the file (any scope)."""
    aliases: dict[str, set[str]] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.asname:
                    aliases.setdefault(a.asname, set()).add(a.name)
                else:
                    root = a.name.split(".")[0]
                    aliases.setdefault(root, set()).add(root)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for a in node.names:
                aliases.setdefault(a.asname or a.name, set()).add(f"{node.module}.{a.name}")
    return aliases


def _qualify(node: ast.AST, aliases: dict[str, set[str]]) -> set[str]:
    """Dotted names an expression may stand for (``np.load`` → ``{"numpy.load"}``); empty if unknown."""
    if isinstance(node, ast.Name):
        names = aliases.get(node.id, {node.id})
    elif isinstance(node, ast.Attribute):
        names = {f"{q}.{node.attr}" for q in _qualify(node.value, aliases)}
    else:
        return set()
    return {CANONICAL.get(n, n) for n in names}


def _keyword_is(call: ast.Call, name: str, value: object) -> bool:
    return any(k.arg == name and isinstance(k.value, ast.Constant) and k.value.value is value for k in call.keywords)


def _conditional_problem(name: str, call: ast.Call, aliases: dict[str, set[str]]) -> str | None:
    """Why a call of a conditionally safe loader is unsafe, or None if it is safe."""
    if name == "torch.load":
        return None if _keyword_is(call, "weights_only", True) else "torch.load without weights_only=True"
    if name == "numpy.load":
        return None if _keyword_is(call, "allow_pickle", False) else "numpy.load without allow_pickle=False"
    loader = next((k.value for k in call.keywords if k.arg == "Loader"), call.args[1] if len(call.args) > 1 else None)
    if loader is not None and _qualify(loader, aliases) and _qualify(loader, aliases) <= SAFE_YAML_LOADERS:
        return None
    return f"{name} without a safe Loader (use yaml.safe_load)"


def scan_source(source: str, filename: str) -> list[str]:
    """``"file:line: problem"`` for every unsafe loader in ``source``."""
    try:
        tree = ast.parse(source, filename=filename)
    except SyntaxError as e:
        return [f"{filename}:{e.lineno}: cannot parse ({e.msg})"]
    aliases = _import_aliases(tree)
    found: set[tuple[int, str]] = set()
    checked: set[int] = set()  # ids of call targets whose arguments were checked

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name in PICKLE_MODULES or a.name.split(".")[0] in PICKLE_MODULES:
                    found.add((node.lineno, f"import {a.name}"))
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            if node.module in PICKLE_MODULES or node.module.split(".")[0] in PICKLE_MODULES:
                found.add((node.lineno, f"from {node.module} import ..."))
            for a in node.names:
                full = CANONICAL.get(f"{node.module}.{a.name}", f"{node.module}.{a.name}")
                if full in ALWAYS_UNSAFE:
                    found.add((node.lineno, ALWAYS_UNSAFE[full]))
                elif full in PICKLE_MODULES:
                    found.add((node.lineno, f"import {full}"))
        elif isinstance(node, ast.Call):
            names = _qualify(node.func, aliases)
            if names & {"importlib.import_module", "__import__"} and node.args:
                arg = node.args[0]
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and arg.value in PICKLE_MODULES:
                    found.add((node.lineno, f"dynamic import of {arg.value}"))
            for name in sorted(names & CONDITIONAL):
                checked.add(id(node.func))
                problem = _conditional_problem(name, node, aliases)
                if problem:
                    found.add((node.lineno, problem))

    for node in ast.walk(tree):
        if isinstance(node, ast.Name | ast.Attribute) and isinstance(node.ctx, ast.Load):
            for name in sorted(_qualify(node, aliases)):
                if name in ALWAYS_UNSAFE:
                    found.add((node.lineno, ALWAYS_UNSAFE[name]))
                elif name in CONDITIONAL and id(node) not in checked:
                    found.add((node.lineno, f"{name} referenced without a call whose arguments can be checked"))
                elif name.split(".")[0] in PICKLE_MODULES or name.rsplit(".", 1)[0] in PICKLE_MODULES:
                    found.add((node.lineno, f"uses {name}"))
    return [f"{filename}:{line}: {problem}" for line, problem in sorted(found)]


def scan_package(package: Path = PACKAGE) -> tuple[int, list[str]]:
    """(number of files scanned, offenders) for every .py file under ``package``."""
    files = sorted(package.rglob("*.py"))
    offenders = [o for f in files for o in scan_source(f.read_text(encoding="utf-8"), str(f.relative_to(ROOT)))]
    return len(files), offenders


def test_package_has_no_unsafe_loader():
    scanned, offenders = scan_package()
    assert scanned >= 20, f"only {scanned} files found under {PACKAGE}: is the scan looking in the right place?"
    assert not offenders, "unsafe loaders (loading must never run code):\n" + "\n".join(offenders)


def test_scanner_flags_plain_torch_and_numpy_loads():
    src = "import numpy as np\nimport torch\n\nw = torch.load(p)\na = np.load(p)\n"
    assert scan_source(src, "x.py") == [
        "x.py:4: torch.load without weights_only=True",
        "x.py:5: numpy.load without allow_pickle=False",
    ]


def test_scanner_passes_safe_loads():
    src = (
        "import numpy as np\nimport torch\nimport yaml\n\n"
        "w = torch.load(p, map_location='cpu', weights_only=True)\n"
        "a = np.load(p, allow_pickle=False)\n"
        "c = yaml.safe_load(s)\n"
        "d = yaml.load(s, Loader=yaml.SafeLoader)\n"
    )
    assert scan_source(src, "x.py") == []


@pytest.mark.parametrize(
    ("src", "problem"),
    [
        ("import pickle\n", "import pickle"),
        ("def f():\n    import cPickle as p\n", "import cPickle"),
        ("from dill import loads\n", "from dill import ..."),
        ("import importlib\nm = importlib.import_module('pickle')\n", "dynamic import of pickle"),
        ("import torch\nw = torch.load(p, weights_only=False)\n", "torch.load without weights_only=True"),
        ("import torch\nw = torch.load(p, **kw)\n", "torch.load without weights_only=True"),
        ("from torch import load\nw = load(p)\n", "torch.load without weights_only=True"),
        ("import torch.serialization as s\nw = s.load(p)\n", "torch.load without weights_only=True"),
        ("import torch\nf = torch.load\n", "torch.load referenced without a call"),
        ("import numpy\na = numpy.load(p, allow_pickle=True)\n", "numpy.load without allow_pickle=False"),
        ("import yaml\nc = yaml.load(s)\n", "yaml.load without a safe Loader"),
        ("import yaml\nc = yaml.load(s, Loader=yaml.FullLoader)\n", "yaml.load without a safe Loader"),
        ("import yaml\nc = yaml.unsafe_load(s)\n", "yaml.unsafe_load builds"),
        ("import pandas as pd\ndf = pd.read_pickle(p)\n", "pandas.read_pickle unpickles"),
        ("import joblib\nm = joblib.load(p)\n", "joblib.load unpickles"),
        ("import torch\nm = torch.jit.load(p)\n", "torch.jit.load loads a TorchScript program"),
        ("from torch.jit import load\n", "torch.jit.load loads a TorchScript program"),
    ],
)
def test_scanner_flags_each_rule(src: str, problem: str):
    offenders = scan_source(src, "x.py")
    assert offenders, f"not flagged:\n{src}"
    assert any(problem in o for o in offenders), offenders
    assert all(o.startswith("x.py:") and o.split(":")[1].isdigit() for o in offenders)


@pytest.mark.parametrize(
    "src",
    [
        "import yaml\nfrom yaml import CSafeLoader\nc = yaml.load(s, CSafeLoader)\n",
        "import json\nd = json.loads(s)\n",
        "from safetensors.torch import load_file\nw = load_file(p)\n",
        "def load(p):\n    return p\nx = load(1)\n",  # a local function named load is not torch.load
        "# torch.load(p) and import pickle in a comment\ns = 'pickle.loads(b)'\n",
    ],
)
def test_scanner_passes_safe_code(src: str):
    assert scan_source(src, "x.py") == []


# ------------------------------------------------------------------------ training checkpoints (resume)
class _RunsCode:
    def __reduce__(self):
        return (Path.touch, (Path(_RunsCode.marker),))


def test_resuming_from_a_hostile_checkpoint_runs_no_code_even_when_the_caller_asks_to_unpickle(tmp_path):
    import torch

    from sensorium.training.callbacks import AtomicCheckpointIO

    _RunsCode.marker = str(tmp_path / "ran")
    ckpt = tmp_path / "last.ckpt"
    torch.save({"state_dict": {}, "payload": _RunsCode()}, ckpt)
    with pytest.raises(Exception, match="Unsupported global"):
        AtomicCheckpointIO().load_checkpoint(ckpt, weights_only=False)
    assert not (tmp_path / "ran").exists()
    torch.save({"state_dict": {"w": torch.ones(2)}, "global_step": 3}, ckpt)
    assert AtomicCheckpointIO().load_checkpoint(ckpt)["global_step"] == 3


def test_the_fsdp_strategy_reads_checkpoints_weights_only(monkeypatch):
    from lightning.pytorch.strategies import FSDPStrategy

    from sensorium.training.callbacks import AdapterFSDPStrategy

    asked = {}
    monkeypatch.setattr(FSDPStrategy, "load_checkpoint", lambda self, path, weights_only=None: asked.update(w=weights_only))
    AdapterFSDPStrategy().load_checkpoint("ckpt", weights_only=False)
    assert asked == {"w": True}
