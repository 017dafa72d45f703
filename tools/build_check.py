r"""Keep BUILD true to the code: `python -m tools.build_check [--print | --write]`.

Checks the top-level BUILD against the Python tree and the imports in it:
every module is in exactly one target, every test file has a test target,
every `__main__` module is the main of a py_binary, every listed src exists,
and each target's deps are exactly the targets its srcs import (parsed with
`ast`, lazy imports included; third-party imports are ignored because Bazel
takes them from the system Python). Each problem is printed with what to
change. `--print` prints a complete BUILD generated from the tree and the
imports (attributes such as `size`, `tags` or `data` of existing targets are
kept); `--write` rewrites BUILD with it (do not redirect `--print` into BUILD: the
shell empties the file before it is read, losing those attributes).

Grouping used by `--print`: one py_library per package directory (`kood`,
`kood_models`, ...; directories whose modules import each other are merged
into one target, since Bazel rejects dependency cycles), one py_binary per
module with an `if __name__ == "__main__":` block, one `kood_py_test` per
`tests/test_*.py`, and the other files of `tests/` (conftest, helpers) in the
testonly py_library `test_helpers`.
"""

from __future__ import annotations

import ast
import dataclasses
import os
import sys

BUILD_FILE = "BUILD"
TEST_MACRO = "kood_py_test"  # defined in tools/build_defs.bzl
TEST_RUNNER = "tools/pytest_main.py"  # the main of every kood_py_test
TESTS_DIR = "tests"
TEST_HELPERS = "test_helpers"
RULES = ("py_library", "py_binary", "py_test", TEST_MACRO)
# Binary names: kood/train.py -> :train, data_prep/real.py -> :data_prep_real.
BINARY_PREFIX = {"kood": "", "bench": "", "tools": ""}
HEADER = (
    "# Bazel targets of kood, kept true to the code by tools/build_check.py\n"
    "# (`python -m tools.build_check` lists what is missing, `--print` prints a\n"
    "# complete suggested BUILD). Third-party packages come from the system Python.\n"
    'load("//:tools/build_defs.bzl", "kood_py_test")\n'
)
_BAZEL_FILES = ("BUILD", "BUILD.bazel", "WORKSPACE", "WORKSPACE.bazel", "MODULE.bazel")
_ATTR_ORDER = ("name", "size", "timeout", "srcs", "main", "args", "data", "imports", "testonly", "tags",
               "visibility", "deps")


@dataclasses.dataclass
class Target:
    """One Python target of BUILD (kood_py_test expanded to its py_test)."""

    name: str
    kind: str  # py_library | py_binary | py_test (kood_py_test is a py_test)
    srcs: list[str]
    deps: list[str] = dataclasses.field(default_factory=list)
    main: str | None = None
    testonly: bool = False
    macro: bool = False
    extra: dict[str, str] = dataclasses.field(default_factory=dict)  # other attributes, as source text
    line: int = 0


def _skip_dir(name: str) -> bool:
    return name.startswith((".", "bazel-")) or name in ("__pycache__", "build", "node_modules", "external") \
        or name.endswith(".egg-info")


def python_files(root: str) -> list[str]:
    """All `.py` files under `root` as sorted `/`-separated relative paths.

    Hidden directories, `bazel-*` output links, `build/`, `__pycache__` and
    `*.egg-info` are skipped.

    Example:
    >>> python_files(".")  # doctest: +SKIP
    ['bench/bench_reader.py', 'data_prep/__init__.py', ...]
    """
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not _skip_dir(d))
        rel = os.path.relpath(dirpath, root)
        for f in filenames:
            if f.endswith(".py"):
                found.append(f if rel == "." else f"{rel}/{f}".replace(os.sep, "/"))
    return sorted(found)


def read_build(path: str) -> list[Target]:
    """Parses the Python targets of a BUILD file (literal attributes only).

    Args:
        path: the BUILD file.

    Returns:
        The targets in file order. `kood_py_test(name="test_x")` becomes a
        py_test with srcs `tests/test_x.py` and the pytest runner.

    Raises:
        ValueError: the file does not parse, or `name`/`srcs`/`deps`/`main`
            of a target is not a literal.

    Example:
    >>> [t.name for t in read_build("BUILD")]  # doctest: +SKIP
    ['kood', 'test_helpers', 'train', ...]
    """
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        tree = ast.parse(text, filename=path)
    except SyntaxError as e:
        raise ValueError(f"{path}:{e.lineno}: BUILD does not parse: {e.msg}") from e
    targets = []
    for node in tree.body:
        if not (isinstance(node, ast.Expr) and isinstance(node.value, ast.Call)
                and isinstance(node.value.func, ast.Name) and node.value.func.id in RULES):
            continue  # load(), package(), filegroup(), ... are not checked
        call, rule = node.value, node.value.func.id
        attrs, extra = {}, {}
        for kw in call.keywords:
            if kw.arg in ("name", "srcs", "deps", "main", "testonly"):
                try:
                    attrs[kw.arg] = ast.literal_eval(kw.value)
                except ValueError:
                    raise ValueError(f"{path}:{kw.value.lineno}: `{kw.arg}` of {rule} must be a literal "
                                     f"(no glob or concatenation) so it can be checked.") from None
            else:
                extra[kw.arg] = ast.get_source_segment(text, kw.value)
        if "name" not in attrs:
            raise ValueError(f"{path}:{node.lineno}: {rule} without a name.")
        name = attrs["name"]
        if rule == TEST_MACRO:
            srcs = [f"{TESTS_DIR}/{name}.py", TEST_RUNNER] + list(attrs.get("srcs", []))
            targets.append(Target(name, "py_test", srcs, list(attrs.get("deps", [])), TEST_RUNNER, True,
                                  True, extra, node.lineno))
        else:
            targets.append(Target(name, rule, list(attrs.get("srcs", [])), list(attrs.get("deps", [])),
                                  attrs.get("main"), bool(attrs.get("testonly", rule == "py_test")), False,
                                  extra, node.lineno))
    return targets


def has_main_block(root: str, path: str) -> bool:
    """True if the module has a top-level `if __name__ == "__main__":`."""
    for node in _parse(root, path).body:
        if isinstance(node, ast.If) and isinstance(node.test, ast.Compare) \
                and isinstance(node.test.left, ast.Name) and node.test.left.id == "__name__":
            return True
    return False


def _parse(root: str, path: str) -> ast.Module:
    with open(os.path.join(root, path), encoding="utf-8") as f:
        return ast.parse(f.read(), filename=path)


def _module_file(files: set[str], dotted: str) -> str | None:
    base = dotted.replace(".", "/")
    for candidate in (f"{base}.py", f"{base}/__init__.py"):
        if candidate in files:
            return candidate
    return None


def imported_files(root: str, path: str, files: set[str],
                   entry_modules: set[str] = frozenset()) -> tuple[dict[str, str], list[str]]:
    """The project files a module imports, at module level or lazily.

    Args:
        root: repository root.
        path: the module, relative to root.
        files: all project `.py` files (relative paths).
        entry_modules: dotted names of runnable modules (`__main__` block). A
            string literal equal to one (`[sys.executable, "-m", "kood.train"]`)
            counts as using it: the module must be in the runfiles.

    Returns:
        `({file: how it is used, e.g. "imports kood.data"}, [dotted names of project
        packages that are not in the tree])`. Importing `a.b.c` counts
        `a/__init__.py` and `a/b/__init__.py` too (Python runs them). A
        conftest.py counts as imported by the tests below it (pytest loads it).

    Example:
    >>> imported_files(".", "kood/data.py", set(python_files(".")))  # doctest: +SKIP
    ({'kood/__init__.py': 'imports kood', 'kood/errors.py': 'imports kood.errors', ...}, [])
    """
    local_tops = {f.split("/")[0] for f in files if f.count("/") == 1 and f.endswith("/__init__.py")}
    local_tops |= {f[:-3] for f in files if "/" not in f}
    found, missing = {}, []

    def add(dotted: str, report_missing: bool = True, verb: str = "imports") -> bool:
        parts = dotted.split(".")
        if parts[0] not in local_tops:
            return False
        for i in range(1, len(parts) + 1):
            f = _module_file(files, ".".join(parts[:i]))
            if f is None:
                if report_missing:
                    missing.append(dotted)
                return False
            if f != path:
                found.setdefault(f, f"{verb} {'.'.join(parts[:i])}")
        return True

    package = path.rsplit("/", 1)[0].replace("/", ".") if "/" in path else ""
    for node in ast.walk(_parse(root, path)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            if add(module):
                for alias in node.names:  # `from kood import data` imports kood/data.py
                    add(f"{module}.{alias.name}", report_missing=False)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in entry_modules:
            add(node.value, report_missing=False, verb="runs")
    name = path.rsplit("/", 1)[-1]
    if name.startswith("test_") or name.endswith("_test.py"):
        parts = path.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            conftest = "/".join(parts[:i] + ["conftest.py"])
            if conftest in files:
                found.setdefault(conftest, "needs conftest.py (pytest loads it)")
    return found, missing


def _label(name: str) -> str:
    return f":{name}"


def _is_test_file(path: str) -> bool:
    name = path.rsplit("/", 1)[-1]
    return path.startswith(f"{TESTS_DIR}/") and name.startswith("test_")


def _binary_name(path: str) -> str:
    top, stem = path.split("/")[0], path.rsplit("/", 1)[-1][:-3]
    if "/" not in path:
        return stem
    return BINARY_PREFIX.get(top, f"{top.replace('/', '_')}_") + stem


def _library_name(directory: str) -> str:
    if directory == TESTS_DIR or directory.startswith(f"{TESTS_DIR}/"):
        return TEST_HELPERS
    return directory.replace("/", "_") or "root"


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index, low, stack, on_stack, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def format_target(kind: str, attrs: dict) -> str:
    """Formats one BUILD rule call the way buildifier would.

    Args:
        kind: rule name, e.g. "py_library".
        attrs: attribute -> Python value (str/bool/list) or, for attributes
            copied from an existing BUILD, a `SourceText` string.

    Example:
    >>> print(format_target("py_library", {"name": "kood", "srcs": ["kood/a.py"]}))
    py_library(
        name = "kood",
        srcs = ["kood/a.py"],
    )
    """
    lines = [f"{kind}("]
    keys = [k for k in _ATTR_ORDER if k in attrs] + sorted(k for k in attrs if k not in _ATTR_ORDER)
    for key in keys:
        value = attrs[key]
        if isinstance(value, SourceText):
            lines.append(f"    {key} = {value},")
        elif isinstance(value, bool):
            lines.append(f"    {key} = {value},")
        elif isinstance(value, list) and len(value) > 1:
            lines.append(f"    {key} = [")
            lines.extend(f'        "{v}",' for v in value)
            lines.append("    ],")
        elif isinstance(value, list):
            lines.append(f"    {key} = [{', '.join(f'{chr(34)}{v}{chr(34)}' for v in value)}],")
        else:
            lines.append(f'    {key} = "{value}",')
    lines.append(")")
    return "\n".join(lines)


class SourceText(str):
    """An attribute value kept verbatim from an existing BUILD (e.g. a glob)."""


def _dep_sort_key(label: str) -> tuple:
    return (not label.startswith(":"), label)


@dataclasses.dataclass
class _Tree:
    files: list[str]
    imports: dict[str, dict[str, str]]  # file -> {imported file: dotted}
    missing: dict[str, list[str]]  # file -> unresolved project imports
    mains: set[str]
    reads: dict[str, list[str]]  # file -> top-level data files/dirs it names (["flags/", "BUILD"])


def _data_entries(root: str, files: list[str]) -> set[str]:
    """Top-level files and directories that are data, not Python ("flags/", "pyproject.toml")."""
    code_dirs = {f.split("/")[0] for f in files if "/" in f}
    entries = set()
    names = os.listdir(root)
    ignored = _git_ignored(root, names)  # e.g. kood_runs/ of a flagfile run from the repository root
    for name in names:
        # Bazel's own files are data only of the BUILD check's test, by hand.
        if _skip_dir(name) or name.endswith(".py") or name in code_dirs or name in _BAZEL_FILES or name in ignored:
            continue
        entries.add(f"{name}/" if os.path.isdir(os.path.join(root, name)) else name)
    return entries


def _git_ignored(root: str, names: list[str]) -> set[str]:
    """The `names` in `root` that git ignores (.gitignore); none outside a git checkout."""
    import subprocess

    try:
        out = subprocess.run(["git", "-C", root, "check-ignore", "--", *names], capture_output=True, text=True)
    except OSError:  # no git
        return set()
    return {line.rstrip("/") for line in out.stdout.splitlines()}


def _named_data(root: str, path: str, entries: set[str]) -> list[str]:
    """Data entries a module names in a string literal (`os.path.join(REPO, "flags")`)."""
    names = {e.rstrip("/"): e for e in entries}
    return sorted({names[n.value] for n in ast.walk(_parse(root, path))
                   if isinstance(n, ast.Constant) and isinstance(n.value, str) and n.value in names})


def _data_expr(entries: list[str]) -> str:
    files = [f'"{e}"' for e in entries if not e.endswith("/")]
    globs = [f'"{e}**"' for e in entries if e.endswith("/")]
    parts = ([f"[{', '.join(files)}]"] if files else []) + ([f"glob([{', '.join(globs)}])"] if globs else [])
    return " + ".join(parts)


def _data_covers(text: str | None, entry: str) -> bool:
    return text is not None and f'"{entry.rstrip("/")}' in text


def _scan(root: str) -> _Tree:
    files = python_files(root)
    fileset = set(files)
    mains = {f for f in files if has_main_block(root, f)}
    entry_modules = {f[:-3].replace("/", ".") for f in mains}
    entries = _data_entries(root, files)
    imports, missing, reads = {}, {}, {}
    for f in files:
        imports[f], missing[f] = imported_files(root, f, fileset, entry_modules)
        reads[f] = _named_data(root, f, entries)
    return _Tree(files, imports, missing, mains, reads)


def _required_deps(target: Target, owner: dict[str, str], tree: _Tree) -> dict[str, tuple[str, str]]:
    """dep name -> (src, dotted import) that needs it."""
    needed = {}
    for src in target.srcs:
        for f, dotted in tree.imports.get(src, {}).items():
            dep = owner.get(f)
            if dep is not None and dep != target.name:
                needed.setdefault(dep, (src, dotted))
    return needed


def suggest_build(root: str) -> str:
    """A complete BUILD for the tree at `root`, generated from files and imports.

    Attributes other than name/srcs/main/deps of existing targets with the
    same name (size, tags, data, ...) are kept.

    Args:
        root: repository root (holds BUILD, if any, and the Python packages).

    Returns:
        The BUILD text; `check(root)` of a tree with this BUILD is clean.

    Example:
    >>> print(suggest_build("."))  # doctest: +SKIP
    """
    tree = _scan(root)
    old = {}
    if os.path.exists(os.path.join(root, BUILD_FILE)):
        old = {t.name: t for t in read_build(os.path.join(root, BUILD_FILE))}
    # Library groups by directory, merged where they import each other.
    group = {}
    for f in tree.files:
        if f in tree.mains or _is_test_file(f) or f == TEST_RUNNER:
            continue
        group[f] = _library_name(f.rsplit("/", 1)[0] if "/" in f else "")
    while True:
        graph = {}
        for f, g in group.items():
            graph.setdefault(g, set()).update(group[i] for i in tree.imports[f] if i in group and group[i] != g)
        cycles = _cycles(graph)
        if not cycles:
            break
        for component in cycles:
            keep = min(component, key=lambda g: (len(g), g))
            for f, g in group.items():
                if g in component:
                    group[f] = keep
    targets = []
    for name in sorted(set(group.values()), key=lambda g: (g == TEST_HELPERS, g)):
        srcs = sorted(f for f, g in group.items() if g == name)
        t = Target(name, "py_library", srcs, testonly=name == TEST_HELPERS)
        if name == TEST_HELPERS and "data" not in old.get(name, Target("", "", [])).extra:
            t.extra["data"] = SourceText('["pyproject.toml"]')
        targets.append(t)
    for f in sorted(tree.mains):
        if _is_test_file(f) or f == TEST_RUNNER:
            continue
        targets.append(Target(_binary_name(f), "py_binary", [f], main=f, testonly=f.startswith(f"{TESTS_DIR}/")))
    for f in tree.files:
        if _is_test_file(f):
            targets.append(Target(f.rsplit("/", 1)[-1][:-3], "py_test", [f, TEST_RUNNER], main=TEST_RUNNER,
                                  testonly=True, macro=True))
    owner = {}
    for t in targets:
        for s in t.srcs:
            if s != TEST_RUNNER:
                owner[s] = t.name
    needs = {t.name: set(_required_deps(t, owner, tree)) for t in targets}
    changed = True
    while changed:  # a target that uses test helpers (even indirectly) must be testonly for Bazel
        changed = False
        testonly = {t.name for t in targets if t.testonly}
        for t in targets:
            if not t.testonly and needs[t.name] & testonly:
                t.testonly = changed = True
    blocks = [HEADER.rstrip("\n")]
    for t in targets:
        deps = sorted((_label(d) for d in needs[t.name]), key=_dep_sort_key)
        if t.macro and TEST_HELPERS in {o for o in owner.values()} and _label(TEST_HELPERS) not in deps:
            deps.append(_label(TEST_HELPERS))  # conftest.py and pyproject.toml for every test
            deps.sort(key=_dep_sort_key)
        attrs = {"name": t.name}
        if not t.macro:
            attrs["srcs"] = t.srcs
        if t.kind == "py_binary":
            attrs["main"] = t.main
        if t.testonly and not t.macro:
            attrs["testonly"] = True
        if t.kind == "py_library":
            attrs["visibility"] = ["//visibility:public"]
        attrs.update(t.extra)
        if t.name in old:
            attrs.update({k: SourceText(v) for k, v in old[t.name].extra.items()})
        reads = sorted({e for src in t.srcs if src != TEST_RUNNER for e in tree.reads[src]})
        if any(not _data_covers(attrs.get("data"), e) for e in reads):
            attrs["data"] = SourceText(_data_expr(reads))
        if deps:
            attrs["deps"] = deps
        blocks.append(format_target(TEST_MACRO if t.macro else t.kind, attrs))
    return "\n\n".join(blocks) + "\n"


def _suggest_block(f: str, tree: _Tree, owner: dict[str, str], libraries: dict[str, str],
                   testonly: set[str]) -> str:
    """What to add for a file that is in no target."""
    probe = Target("?", "py_test" if _is_test_file(f) else "py_binary", [f])
    deps = sorted((_label(d) for d in _required_deps(probe, owner, tree)), key=_dep_sort_key)
    if _is_test_file(f):
        if TEST_HELPERS in libraries.values() and _label(TEST_HELPERS) not in deps:
            deps = sorted(deps + [_label(TEST_HELPERS)], key=_dep_sort_key)
        name = f.rsplit("/", 1)[-1][:-3]
        if f != f"{TESTS_DIR}/{name}.py":
            return (f"{f} is a test in no target, and {TEST_MACRO} only takes {TESTS_DIR}/<name>.py; "
                    f"add a py_test for it by hand.")
        return f"{f} has no test target; add:\n" + _indent(format_target(TEST_MACRO, {"name": name, "deps": deps}))
    if f in tree.mains:
        attrs = {"name": _binary_name(f), "srcs": [f], "main": f}
        if any(d[1:] in testonly for d in deps):
            attrs["testonly"] = True
        if deps:
            attrs["deps"] = deps
        block = format_target("py_binary", attrs)
        return f"{f} has a __main__ block but is in no target; add:\n" + _indent(block)
    directory = f.rsplit("/", 1)[0] if "/" in f else ""
    if directory in libraries:
        return f"{f} is in no target; add it to srcs of {_label(libraries[directory])}."
    attrs = {"name": _library_name(directory), "srcs": [f], "visibility": ["//visibility:public"]}
    if deps:
        attrs["deps"] = deps
    block = format_target("py_library", attrs)
    return f"{f} is in no target; add it to a py_library, e.g.:\n" + _indent(block)


def _indent(text: str) -> str:
    return "\n".join("    " + line for line in text.splitlines())


def check(root: str) -> tuple[list[str], list[str]]:
    """Compares BUILD at `root` with the Python files and their imports.

    Args:
        root: repository root holding BUILD.

    Returns:
        `(problems, warnings)`: problems make BUILD wrong (each says what to
        change); warnings are code problems BUILD cannot fix (an import of a
        project module that does not exist).

    Raises:
        ValueError: BUILD is missing or does not parse.

    Example:
    >>> problems, warnings = check(".")  # doctest: +SKIP
    >>> problems
    ['kood/foo.py is in no target; add it to srcs of :kood.']
    """
    build_path = os.path.join(root, BUILD_FILE)
    if not os.path.exists(build_path):
        raise ValueError(f"No {BUILD_FILE} in {root}; write one with `python -m tools.build_check --print`.")
    targets = read_build(build_path)
    tree = _scan(root)
    problems, warnings = [], []
    by_name = {}
    for t in targets:
        if t.name in by_name:
            problems.append(f"BUILD:{t.line}: two targets are named {_label(t.name)}; rename one.")
        by_name[t.name] = t
    owner, owners = {}, {}
    for t in targets:
        for s in t.srcs:
            if s == TEST_RUNNER and t.macro:
                continue
            owners.setdefault(s, []).append(t.name)
            owner.setdefault(s, t.name)
            if not os.path.isfile(os.path.join(root, s)):
                problems.append(f"{_label(t.name)} lists {s}, which does not exist; remove it from srcs "
                                f"(or remove the target).")
    libraries = {}
    for t in targets:
        if t.kind == "py_library":
            for s in t.srcs:
                libraries.setdefault(s.rsplit("/", 1)[0] if "/" in s else "", t.name)
    for f in tree.files:
        if f == TEST_RUNNER and any(t.macro for t in targets):
            continue
        names = owners.get(f, [])
        if not names:
            problems.append(_suggest_block(f, tree, owner, libraries, {t.name for t in targets if t.testonly}))
        elif len(names) > 1:
            problems.append(f"{f} is in {len(names)} targets ({', '.join(map(_label, names))}); "
                            f"keep it in one and depend on that one.")
        elif f in tree.mains and not (by_name[names[0]].kind in ("py_binary", "py_test")
                                      and by_name[names[0]].main == f):
            problems.append(f"{f} has a __main__ block but is not the main of a py_binary (it is in "
                            f"{_label(names[0])}); move it to its own py_binary with main = \"{f}\".")
        elif _is_test_file(f) and by_name[names[0]].kind != "py_test":
            problems.append(f"{f} is a test file in {by_name[names[0]].kind} {_label(names[0])}; "
                            f"give it its own {TEST_MACRO}.")
    required = {}
    for t in targets:
        needed = _required_deps(t, owner, tree)
        required[t.name] = set(needed)
        declared = {}
        for label in t.deps:
            if label.startswith("@"):
                continue  # third-party, not checked
            name = label[3:] if label.startswith("//:") else label[1:] if label.startswith(":") else None
            if name is None or name not in by_name:
                problems.append(f"{_label(t.name)} depends on {label}, which is no target in BUILD; remove it.")
                continue
            declared[name] = label
        for dep, (src, dotted) in sorted(needed.items()):
            if dep not in declared:
                problems.append(f"{_label(t.name)} is missing dep {_label(dep)} ({src} {dotted}); "
                                f"add \"{_label(dep)}\" to its deps.")
            elif by_name[dep].testonly and not t.testonly:
                problems.append(f"{_label(t.name)} depends on testonly {_label(dep)} ({src} {dotted}); "
                                f"only tests and testonly targets may use test helpers.")
        for dep, label in sorted(declared.items()):
            if dep not in needed and not (t.macro and dep == TEST_HELPERS):
                problems.append(f"{_label(t.name)} has dep {label} but none of its srcs imports it; remove it.")
    for t in targets:
        for src in t.srcs:
            if src == TEST_RUNNER and t.macro:
                continue
            for entry in tree.reads.get(src, []):
                if not _data_covers(t.extra.get("data"), entry):
                    problems.append(f"{_label(t.name)} does not have {entry} in its data ({src} names "
                                    f"\"{entry.rstrip('/')}\"); add data = {_data_expr([entry])}.")
    for component in _cycles(required):
        problems.append(f"targets {', '.join(map(_label, component))} import each other (Bazel rejects "
                        f"dependency cycles); merge them into one target.")
    for f in tree.files:
        for dotted in sorted(set(tree.missing[f])):
            warnings.append(f"{f} imports {dotted}, which is not in the tree (not a BUILD problem).")
    return problems, warnings


def write_build(root: str) -> None:
    """Rewrites BUILD from `suggest_build(root)` atomically. Not `--print > BUILD`: the shell
    empties BUILD before it is read, which loses the size/tags/data of existing targets."""
    text = suggest_build(root)
    path = os.path.join(root, BUILD_FILE)
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def run(root: str, print_build: bool = False) -> int:
    """Prints the check's findings (or a suggested BUILD); returns the exit code.

    Args:
        root: repository root holding BUILD.
        print_build: print `suggest_build(root)` instead of checking.

    Returns:
        0 if BUILD is consistent (or a BUILD was printed), 1 otherwise.

    Example:
    >>> run(".")  # doctest: +SKIP
    BUILD is consistent with the code.
    0
    """
    if print_build:
        sys.stdout.write(suggest_build(root))
        return 0
    try:
        problems, warnings = check(root)
    except ValueError as e:
        print(f"error: {e}")
        return 1
    for w in warnings:
        print(f"warning: {w}")
    for p in problems:
        print(p)
    if problems:
        print(f"\n{len(problems)} BUILD problem(s). Update BUILD: python -m tools.build_check --write "
              f"(keeps size/tags/data of existing targets).")
        return 1
    print("BUILD is consistent with the code.")
    return 0


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    root = FLAGS.root or _DEFAULT_ROOT
    if FLAGS.write:
        write_build(root)
        print(f"wrote {os.path.join(root, BUILD_FILE)}")
    sys.exit(run(root, FLAGS.print))


if __name__ == "__main__":
    from absl import app, flags

    _DEFAULT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    flags.DEFINE_string("root", None, "Repository root holding BUILD (default: the checkout this file is in).")
    flags.DEFINE_boolean("print", False, "Print a complete BUILD generated from the tree and the imports "
                         "instead of checking (existing size/tags/data attributes are kept).")
    flags.DEFINE_boolean("write", False, "Rewrite BUILD from the tree and the imports (keeps existing "
                         "size/tags/data attributes), then check it.")
    FLAGS = flags.FLAGS
    app.run(main)
