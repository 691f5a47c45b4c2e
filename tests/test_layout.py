"""The house rules a reader relies on, checked: the root is the tutorial (a few files, a short reading
path, lines that fit), extras are imported only where a flag asks for them, no import circle, and the
README's file tree counts what `wc -l` counts."""
import ast
import re
import subprocess
import sys

from conftest import ROOT, random_meta_state, write_meta

ROOT_FILES = {p.stem: p for p in ROOT.glob("*.py")}
EXTRAS = {f"extras.{p.stem}": p for p in (ROOT / "extras").glob("*.py") if p.stem != "__init__"}
READING_PATH = ("model.py", "sasq.py", "train.py")


def imports(path, top_only=False):
    """The project modules `path` imports (dotted, e.g. extras.export), at the top or anywhere."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_only else ast.walk(tree)
    names = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names |= {f"{node.module}.{a.name}" for a in node.names} | {node.module}
    return {n for n in names if n in ROOT_FILES or n in EXTRAS}


def test_the_root_is_the_tutorial():
    assert len(ROOT_FILES) <= 9, sorted(ROOT_FILES)
    lines = sum(len((ROOT / f).read_text().splitlines()) for f in READING_PATH)
    assert lines <= 900, f"the reading path is {lines} lines"
    wide = [f"{p.name}:{i}" for p in ROOT_FILES.values()
            for i, line in enumerate(p.read_text().splitlines(), 1) if len(line) > 100]
    assert not wide, f"lines over 100 columns: {wide[:10]} ({len(wide)})"


def test_root_imports_extras_only_inside_a_branch():
    at_top = {m: imports(p, top_only=True) & set(EXTRAS) for m, p in ROOT_FILES.items()}
    assert not any(at_top.values()), at_top
    assert "extras.kvquant" in imports(ROOT / "train.py")     # the walker really sees nested imports
    assert "sasq" not in {n for m in ("model", "sasq") for n in imports(ROOT_FILES[m]) if n != m}


def test_imports_form_no_circle():
    modules = {**ROOT_FILES, **EXTRAS}
    graph, state = {m: imports(p) - {m} for m, p in modules.items()}, {}

    def visit(m, path):                  # depth first: meeting a module still open is a circle
        assert state.get(m) != "open", "import circle: " + " -> ".join(path + [m])
        if state.get(m) is None:
            state[m] = "open"
            for n in sorted(graph[m]):
                visit(n, path + [m])
            state[m] = "done"
    for m in sorted(graph):
        visit(m, [])
    assert "train" in graph["extras.fsdp"] and "extras.fsdp" in graph["extras.bench_train"]


def test_default_train_imports_no_extra(tmp_path):
    """A default `python train.py` (no --rotate, no --kv-bits) loads none of the extras."""
    write_meta(tmp_path / "tiny", random_meta_state())
    (tmp_path / "text.txt").write_text("A short line of text for a tiny model. " * 200)
    argv = ["train.py", "--ckpt", str(tmp_path / "tiny"), "--calib", str(tmp_path / "text.txt"),
            "--seq-len", "32", "--steps", "1", "--batch-size", "1", "--calib-windows", "1",
            "--heldout", "1", "--out", str(tmp_path / "s.safetensors")]
    code = ("import runpy, sys; sys.argv = %r; runpy.run_path('train.py', run_name='__main__')\n"
            "print('EXTRAS', sorted(m for m in sys.modules if m.startswith('extras')))") % argv
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0 and "scales saved" in r.stdout, r.stderr[-2000:]
    assert "EXTRAS []" in r.stdout, r.stdout


def test_readme_tree_counts_lines():
    """The README's file tree says `name.py  N lines` for each tutorial file; N is what wc -l says."""
    text = (ROOT / "README.md").read_text()
    rows = re.findall(r"^\s*([\w/]+\.py)\s+(\d+) lines", text, re.M)
    assert len(rows) >= 6, rows
    for name, n in rows:
        assert len((ROOT / name).read_text().splitlines()) == int(n), name
