"""The package's layout rules, read from the source with ``ast`` (no import runs):

- layers only point down: ``_backend`` (descriptors + dispatch) -> ``ops`` -> ``nn`` ->
  ``models`` -> ``train`` / ``inference`` -> ``analysis`` / ``robustness`` -> ``cli`` (the
  package ``msa_fast/cli/``: every ``msa_fast.cli.*`` module, by prefix); no module imports
  one of a higher layer, and no import cycle joins modules. Every import counts, a
  function-level (lazy) one too: it is the same arrow, only taken later. Within the shared
  ``train`` / ``inference`` layer, ``train`` (the run loader of ``train/checkpoint.py``
  included) imports nothing of ``inference``: the Predictor reads runs through it, not the
  other way round;
- production code does not import the oracles of ``msa_fast/ops/reference.py``; what it
  shares with them lives in ``msa_fast/ops/_common.py``;
- no code of ``msa_fast`` assigns to an attribute of a module or class it imported from
  elsewhere (monkey-patching torch, numpy, triton, ...): it leaks into every user's process.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

PKG = pathlib.Path(__file__).resolve().parents[1] / "msa_fast"

# (layer, module prefixes), lowest first. A module belongs to the layer of its longest
# matching prefix; the package root ``msa_fast`` (its __init__: the public facade that
# re-exports ops, nn and the backend switches) sits with ``nn``, the highest layer it
# imports. The foundation holds what depends on no other part of msa_fast: the compiled
# extension and its loader, the measured auto order, the file writers (``_io``), the Triton
# kernels, data and metrics.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("foundation", ("msa_fast._C", "msa_fast._ext", "msa_fast._auto_order", "msa_fast._io", "msa_fast.kernels",
                    "msa_fast.data", "msa_fast.metrics")),
    ("_backend", ("msa_fast._backend",)),
    ("ops", ("msa_fast.ops",)),
    ("nn", ("msa_fast.nn", "msa_fast")),
    ("models", ("msa_fast.models",)),
    ("train/inference", ("msa_fast.train", "msa_fast.inference")),
    ("analysis", ("msa_fast.robustness", "msa_fast.analysis")),
    ("cli", ("msa_fast.cli", "msa_fast.__main__")),
]


def _modules() -> dict[str, pathlib.Path | None]:
    """Every module of the package -> its source (``None``: a compiled extension)."""
    mods: dict[str, pathlib.Path | None] = {}
    for p in PKG.rglob("*.py"):
        parts = list(p.relative_to(PKG.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        mods[".".join(parts)] = p
    mods.setdefault("msa_fast._C", None)  # built or not, ``from msa_fast import _C`` names it
    return mods


MODULES = _modules()


def _layer(mod: str) -> int:
    best, rank = -1, None
    for i, (_, prefixes) in enumerate(LAYERS):
        for pre in prefixes:
            if (mod == pre or mod.startswith(pre + ".")) and len(pre) > best:
                best, rank = len(pre), i
    assert rank is not None, f"{mod}: in no layer of tests/test_layers.py LAYERS: place it there"
    return rank


def _imports(mod: str, path: pathlib.Path) -> list[tuple[str, int]]:
    """``(imported msa_fast module, line)`` for every import in ``path``, at any depth.

    ``from P import name`` is an import of ``P.name`` when that is a module, else of ``P``
    (the package's ``__init__``). A parent package that Python imports on the way is no
    edge of its own."""
    is_pkg = path.name == "__init__.py"
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names if a.name.split(".")[0] == "msa_fast"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = mod.split(".") if is_pkg else mod.split(".")[:-1]
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "msa_fast":
                continue
            for a in node.names:
                sub = f"{target}.{a.name}"
                out.append((sub if sub in MODULES else target, node.lineno))
    return out


def _graph() -> dict[str, list[tuple[str, int]]]:
    return {m: _imports(m, p) for m, p in sorted(MODULES.items()) if p is not None}


def _rel(mod: str) -> str:
    p = MODULES[mod]
    return str(p.relative_to(PKG.parent)) if p is not None else mod


def test_every_module_has_a_layer():
    for mod in MODULES:
        _layer(mod)


def test_layers_only_point_down():
    bad = []
    for mod, edges in _graph().items():
        for target, line in edges:
            if target not in MODULES:
                bad.append(f"{_rel(mod)}:{line}: imports {target}, which is no module of msa_fast")
            elif _layer(target) > _layer(mod):
                bad.append(f"{_rel(mod)}:{line}: {mod} ({LAYERS[_layer(mod)][0]}) imports {target} "
                           f"({LAYERS[_layer(target)][0]}), a higher layer")
    assert not bad, "imports that point up:\n" + "\n".join(bad)


def test_no_import_cycle():
    graph = {m: sorted({t for t, _ in edges if t in MODULES and t != m}) for m, edges in _graph().items()}
    lines = {(m, t): line for m, edges in _graph().items() for t, line in reversed(edges)}
    state: dict[str, int] = {}  # 1: on the DFS stack, 2: done
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for t in graph.get(m, ()):
            if state.get(t) == 1:
                return stack[stack.index(t):] + [t]
            if t not in state and (cycle := visit(t)) is not None:
                return cycle
        stack.pop()
        state[m] = 2
        return None

    for m in graph:
        if m not in state and (cycle := visit(m)) is not None:
            arrows = [f"{_rel(a)}:{lines[(a, b)]}: {a} -> {b}" for a, b in zip(cycle, cycle[1:])]
            pytest.fail("import cycle:\n" + "\n".join(arrows))


def test_the_cli_package_is_the_top_layer():
    cli = [m for m in MODULES if m == "msa_fast.cli" or m.startswith("msa_fast.cli.")]
    assert {"msa_fast.cli", "msa_fast.cli._common", "msa_fast.cli.train", "msa_fast.cli.eval",
            "msa_fast.cli.predict", "msa_fast.cli.export", "msa_fast.cli.serve",
            "msa_fast.cli.robustness"} <= set(cli)
    top = len(LAYERS) - 1
    assert all(_layer(m) == top for m in cli)
    # msa_fast.cli.robustness is the CLI's, above msa_fast.robustness (the longest prefix wins)
    assert _layer("msa_fast.cli.robustness") > _layer("msa_fast.robustness")


def test_train_imports_neither_inference_nor_cli():
    bad = [f"{_rel(mod)}:{line}: {mod} imports {target}"
           for mod, edges in _graph().items() if mod == "msa_fast.train" or mod.startswith("msa_fast.train.")
           for target, line in edges if target.startswith(("msa_fast.inference", "msa_fast.cli"))]
    assert not bad, "\n".join(bad)


def test_the_layer_check_sees_function_level_and_relative_imports(tmp_path):
    src = tmp_path / "m.py"
    src.write_text("def f():\n    from msa_fast import nn\n    from . import attention\n")
    got = _imports("msa_fast.ops.m", src)
    assert got == [("msa_fast.nn", 2), ("msa_fast.ops.attention", 3)]
    assert _layer("msa_fast.nn") > _layer("msa_fast.ops.m")


# --------------------------------------------------------------------------- #
# The oracles stay out of production code
# --------------------------------------------------------------------------- #

REFERENCE = "msa_fast.ops.reference"
# The files that may import the reference, each because an op's backend *is* it: the op's
# descriptor (``_backend.OpSpec``) takes ``reference.<op>`` as its ``eager`` implementation
# (contract §2: eager is the ground truth and the fallback of ``auto``). Not for helpers: those
# come from ``ops/_common.py`` (checked below).
EAGER_IS_THE_REFERENCE = {
    "msa_fast.ops.attention",  # eager attention = reference.attention
    "msa_fast.ops.contrastive",  # eager nt_xent / triplet / fd_cmdie_contrastive_loss
    "msa_fast.ops.dipu",  # eager dipu = reference.dipu
    "msa_fast.ops.dual_gate",  # eager dual_gate
    "msa_fast.ops.gap",  # eager gated_attention_pool
    "msa_fast.ops.layer_norm",  # eager add_layer_norm
    "msa_fast.ops.pair_mining",  # eager mine_pairs
    "msa_fast.ops",  # re-exports the module as the public ``msa_fast.ops.reference`` (contract §2)
}


def _common_names() -> set[str]:
    tree = ast.parse((PKG / "ops" / "_common.py").read_text())
    return {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}


def test_production_code_does_not_import_the_reference():
    shared = _common_names()
    assert {"MinedPairs", "mining_queries", "sentiment_classes", "sinusoidal_position_encoding",
            "reduce_loss"} <= shared
    bad = []
    for mod, edges in _graph().items():
        if mod in (REFERENCE, "msa_fast.ops._common"):
            continue
        for target, line in edges:
            if target == REFERENCE and mod not in EAGER_IS_THE_REFERENCE:
                bad.append(f"{_rel(mod)}:{line}: imports {REFERENCE} (only an op whose eager backend is the "
                           f"reference may; shared helpers are in msa_fast.ops._common)")
        tree = ast.parse(MODULES[mod].read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == REFERENCE:
                bad.append(f"{_rel(mod)}:{node.lineno}: from {REFERENCE} import "
                           f"{', '.join(a.name for a in node.names)} (take the module: reference.<op>)")
            if isinstance(node, ast.Attribute) and node.attr in shared and isinstance(node.value, (ast.Name, ast.Attribute)) \
                    and (node.value.id if isinstance(node.value, ast.Name) else node.value.attr) == "reference":
                bad.append(f"{_rel(mod)}:{node.lineno}: reference.{node.attr}: a shared helper, import it "
                           f"from msa_fast.ops._common")
    assert not bad, "\n".join(bad)


# --------------------------------------------------------------------------- #
# No monkey-patching of what msa_fast imports
# --------------------------------------------------------------------------- #

# None known: the one fix msa_fast needed of a third-party module (Triton 3.6's interpreter)
# lives in tools/triton_interpreter.py, outside the package, applied by the test harness
MONKEY_PATCH_KNOWN: dict = {}


def _foreign_names(tree: ast.AST) -> set[str]:
    """Names bound anywhere in ``tree`` to something imported from outside msa_fast."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.asname or a.name.split(".")[0] for a in node.names if a.name.split(".")[0] != "msa_fast"}
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module != "__future__" \
                and (node.module or "").split(".")[0] != "msa_fast":
            names |= {a.asname or a.name for a in node.names}
    # plain aliases of those: ``cfg = torch._dynamo.config`` (no call: a call makes a new object)
    changed = True
    while changed:
        changed = False
        for node in ast.walk(tree):
            if isinstance(node, ast.Assign) and _root(node.value) in names:
                for t in node.targets:
                    if isinstance(t, ast.Name) and t.id not in names:
                        names.add(t.id)
                        changed = True
    return names


def _root(e: ast.AST) -> str | None:
    """The name at the root of an attribute chain ``a.b.c`` (``None`` for anything else)."""
    if not isinstance(e, (ast.Attribute, ast.Name)):
        return None
    while isinstance(e, ast.Attribute):
        e = e.value
    return e.id if isinstance(e, ast.Name) else None


def _patches(tree: ast.AST) -> list[tuple[int, str]]:
    foreign = _foreign_names(tree)
    found = []
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, (ast.Assign, ast.Delete)):
            targets = node.targets
        elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
            targets = [node.target]
        flat = []
        for t in targets:
            flat += t.elts if isinstance(t, (ast.Tuple, ast.List)) else [t]
        for t in flat:
            chain = t.value if isinstance(t, ast.Subscript) else t  # torch.x.__dict__["y"] = ...
            if isinstance(chain, ast.Attribute) and _root(chain) in foreign:
                found.append((node.lineno, ast.unparse(t)))
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) \
                and node.func.id in ("setattr", "delattr") and node.args and _root(node.args[0]) in foreign:
            found.append((node.lineno, ast.unparse(node.args[0]) + "." + ast.unparse(node.args[1])))
    return found


def test_the_patch_check_finds_patches():
    tree = ast.parse("import torch\nfrom torch import nn\nimport numpy as np\ncfg = torch._dynamo.config\n"
                     "def f(x):\n    torch.backends.cudnn.benchmark = False\n    nn.Module.foo = 1\n"
                     "    cfg.cache_size_limit = 64\n    setattr(np, 'x', 1)\n    x.y = 1\n"
                     "    torch.ops.__dict__['k'] = 1\n    y = torch.zeros(1)\n    y.z = 2\n")
    assert sorted(line for line, _ in _patches(tree)) == [6, 7, 8, 9, 11]


def test_no_code_patches_third_party_modules_or_classes():
    bad = []
    for p in sorted(PKG.rglob("*.py")):
        rel = str(p.relative_to(PKG.parent))
        for line, what in _patches(ast.parse(p.read_text(), rel)):
            if (rel, what) not in MONKEY_PATCH_KNOWN:
                bad.append(f"{rel}:{line}: assigns {what} (use a scoped patch, e.g. "
                           f"torch._dynamo.config.patch / torch.backends.cudnn.flags)")
    assert not bad, "\n".join(bad)
