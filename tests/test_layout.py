"""The house rules a reader relies on, checked: the project's modules import each other without a circle,
no file outgrows a sitting, and the README's reading table counts what `wc -l` (or the code itself) counts."""
import ast
import re

from conftest import ROOT

MODULES = {p.stem: p for p in ROOT.glob("*.py")}
LIMIT = 470        # "about 450 lines": a file a reader finishes


def local_imports(path):
    """The project modules `path` imports, at the top or inside a function."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return (names & set(MODULES)) - {path.stem}


def test_imports_form_no_circle():
    graph, state = {m: local_imports(p) for m, p in MODULES.items()}, {}

    def visit(m, path):                  # depth first: meeting a module still open is a circle
        assert state.get(m) != "open", "import circle: " + " -> ".join(path + [m])
        if state.get(m) is None:
            state[m] = "open"
            for n in sorted(graph[m]):
                visit(n, path + [m])
            state[m] = "done"
    for m in sorted(graph):
        visit(m, [])
    assert "fsdp" in graph["bench_train"] and "train" in graph["fsdp"]     # the graph is really read


def test_no_file_is_too_long_to_read():
    long = {p.name: n for p in MODULES.values() if (n := len(p.read_text().splitlines())) > LIMIT}
    assert not long, f"files over {LIMIT} lines: {long}"


def lines_of(file, names):
    """Lines of a whole file, or of the named top-level functions/classes in it (summed)."""
    text = (ROOT / file).read_text()
    if not names:
        return len(text.splitlines())
    defs = {n.name: n for n in ast.parse(text).body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    return sum(defs[n].end_lineno - defs[n].lineno + 1 for n in names)


def test_readme_reading_table_counts_lines():
    table = re.search(r"\| read \| lines \| what \|\n\|[-|]+\|\n((?:\|.*\n)+)", (ROOT / "README.md").read_text())
    rows = [r.split("|")[1:3] for r in table.group(1).splitlines()]
    assert len(rows) >= 5
    for read, lines in rows:
        first, *more = re.findall(r"`([^`]+)`", read)
        file, _, name = first.partition(": ")
        assert lines_of(file, [name, *more] if name else more) == int(lines), read
