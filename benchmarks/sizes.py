"""sizes.py -- what a reader faces: the length of each module, its longest function, each
trainer's train(), lines over 120 characters, and the size of README.md and docs/.

    python benchmarks/sizes.py

Counts are plain lines (`wc -l`); a function's length runs from its `def` to its last line.
Whether a default run loads an opt-in module or starts the profiler is tested, not printed
here: tests/test_layout.py.
"""
import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def functions(tree):
    """(name, length in lines) of every function, methods and nested ones included."""
    return [(n.name, n.end_lineno - n.lineno + 1) for n in ast.walk(tree)
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]


def main():
    print("| module | lines | top-level definitions | longest function | train() | lines > 120 chars |")
    print("|---|---:|---:|---|---:|---:|")
    for f in sorted(REPO.glob("*.py")):
        text = f.read_text(encoding="utf-8")
        tree = ast.parse(text)
        fns = functions(tree)
        name, n = max(fns, key=lambda x: x[1]) if fns else ("-", 0)
        top = sum(isinstance(x, (ast.FunctionDef, ast.ClassDef)) for x in tree.body)
        train = next((k for m, k in functions(tree) if m == "train"), None)
        wide = sum(len(line) > 120 for line in text.splitlines())
        print(f"| {f.name} | {len(text.splitlines()):,} | {top} | {name} ({n}) | {train or '-'} | {wide} |")
    docs = sorted((REPO / "docs").glob("*.md"))
    print(f"\nREADME.md: {(REPO / 'README.md').stat().st_size / 1024:.1f} KB; docs/: "
          f"{sum(d.stat().st_size for d in docs) / 1024:.1f} KB in {len(docs)} files ("
          + ", ".join(f"{d.name} {d.stat().st_size / 1024:.1f}" for d in docs) + ")")


if __name__ == "__main__":
    main()
