"""The house rules, checked on the source: no family-name branches outside vlseg/families, decoders see only the
feature contract, the library never imports its edges, and the edges (finetune, demo, benchmarks) use only the
public API."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PUBLIC = {"vlseg", "vlseg.training", "vlseg.data", "vlseg.prompts", "vlseg.evaluation", "vlseg.visualize",
          "vlseg.naming", "vlseg.precision", "vlseg.cli", "vlseg.families", "vlseg.vqa", "vlseg.video",
          "vlseg.language_use", "vlseg.metrics"}


def _is_module(dotted: str) -> bool:
    path = ROOT.joinpath(*dotted.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _runtime_nodes(tree: ast.AST):
    """Every node except those under ``if TYPE_CHECKING:`` (type-only imports make no import at run time)."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            continue
        yield node
        yield from _runtime_nodes(node)


def imports(path: Path) -> set[str]:
    out = set()
    for node in _runtime_nodes(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            base = node.module
            if node.level:  # relative: resolve against the file's package
                pkg = path.relative_to(ROOT).with_suffix("").parts[:-node.level]
                base = ".".join([*pkg, node.module])
            out.add(base)
            # "from vlseg import metrics" imports the module vlseg.metrics, not only the package
            out |= {f"{base}.{a.name}" for a in node.names if _is_module(f"{base}.{a.name}")}
    return out


def test_no_family_name_branches_outside_families():
    pattern = re.compile(r"family\s*(==|!=)|\.family\s+in\s|== ?[\"'](composed|clipseg|sam3|vqa)[\"']")
    hits = [f"{p.relative_to(ROOT)}:{n}" for p in (ROOT / "vlseg").rglob("*.py")
            if "families" not in p.parts for n, line in enumerate(p.read_text().splitlines(), 1)
            if pattern.search(line)]
    assert not hits, hits


def test_decoders_see_only_the_feature_contract():
    for p in (ROOT / "vlseg" / "decoders").glob("*.py"):
        bad = {m for m in imports(p) if m.startswith(("vlseg.encoders", "vlseg.families", "vlseg.model"))}
        assert not bad, (p.name, bad)


def test_library_never_imports_its_edges():
    for p in (ROOT / "vlseg").rglob("*.py"):
        bad = {m for m in imports(p) if m.split(".")[0] in ("finetune", "demo", "benchmarks")}
        assert not bad, (p, bad)


def test_edges_use_the_public_api():
    edges = [*(ROOT / "finetune").glob("*.py"), *(ROOT / "demo").glob("*.py"), *(ROOT / "benchmarks").glob("*.py")]
    for p in edges:
        used = {m for m in imports(p) if m.split(".")[0] == "vlseg"}
        private = {m for m in used if not any(m == pub or m.startswith(pub + ".") and pub in
                                              ("vlseg.families", "vlseg.vqa") for pub in PUBLIC)}
        assert not private, (p.relative_to(ROOT), private)


def test_imports_see_modules_imported_by_name(tmp_path):
    f = tmp_path / "edge.py"
    f.write_text("from vlseg import metrics, segment\nfrom vlseg.data import PairedAugment\nimport vlseg.stats\n")
    assert imports(f) == {"vlseg", "vlseg.metrics", "vlseg.data", "vlseg.stats"}  # segment is a function


def test_no_import_circle_between_factory_model_checkpoint():
    """checkpoint.py is file IO (no model or factory import); model.py never imports the factory or families."""
    ck = imports(ROOT / "vlseg" / "checkpoint.py")
    assert not {m for m in ck if m in ("vlseg.factory", "vlseg.model", "vlseg.families")}, ck
    md = imports(ROOT / "vlseg" / "model.py")
    assert not {m for m in md if m.startswith(("vlseg.factory", "vlseg.families"))}, md
