"""BUILD stays true to the code (tools/build_check.py), and the check itself works."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from tools import build_check

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A small made-up project in the repository's layout.
BASE_TREE = {
    "kood/__init__.py": "",
    "kood/errors.py": "class DataError(ValueError):\n    pass\n",
    "kood/data.py": "import numpy as np\nfrom kood.errors import DataError\n",
    "kood/train.py": "from absl import app\nfrom kood import data\n\nif __name__ == '__main__':\n    app.run(data)\n",
    "tests/__init__.py": "",
    "tests/conftest.py": "import pytest\n",
    "tests/helpers.py": "from kood.data import np\n",
    "tests/test_data.py": "from kood import data\nfrom tests.helpers import np\n",
    "tools/pytest_main.py": "import pytest\n\nif __name__ == '__main__':\n    pytest.main()\n",
}


def make_tree(root, files: dict[str, str], build: str | None = None) -> str:
    for path, text in files.items():
        full = os.path.join(root, path)
        os.makedirs(os.path.dirname(full), exist_ok=True)
        with open(full, "w") as f:
            f.write(text)
    with open(os.path.join(root, "BUILD"), "w") as f:
        f.write(build_check.suggest_build(str(root)) if build is None else build)
    return str(root)


def add_files(root, files: dict[str, str]) -> None:
    for path, text in files.items():
        os.makedirs(os.path.dirname(os.path.join(root, path)), exist_ok=True)
        with open(os.path.join(root, path), "w") as f:
            f.write(text)


def edit_build(root, old: str, new: str) -> None:
    path = os.path.join(root, "BUILD")
    with open(path) as f:
        text = f.read()
    assert old in text, f"{old!r} not in BUILD:\n{text}"
    with open(path, "w") as f:
        f.write(text.replace(old, new, 1))


def test_repository_build_matches_the_code():
    problems, _ = build_check.check(REPO)
    assert not problems, ("BUILD is out of date with the code:\n" + "\n".join(problems)
                          + "\nRun `python -m tools.build_check` for details or "
                            "`python -m tools.build_check --write`.")


ISSUE_ENTRY_POINTS = ["kood/train.py", "kood/evaluate.py", "kood/export.py", "kood/bench.py"] + [
    f"data_prep/{tool}.py" for tool in ("real", "synthetic", "outliers", "verify", "demo", "synthesize")]


def test_repository_build_has_a_py_binary_per_entry_point():
    targets = build_check.read_build(os.path.join(REPO, "BUILD"))
    mains = {t.main for t in targets if t.kind == "py_binary"}
    present = [f for f in ISSUE_ENTRY_POINTS if os.path.exists(os.path.join(REPO, f))]
    assert "kood/train.py" in present
    assert [f for f in present if f not in mains] == []
    libraries = {t.name: t for t in targets if t.kind == "py_library"}
    assert "kood/errors.py" in libraries["kood"].srcs and libraries["test_helpers"].testonly


def test_suggested_build_is_clean_and_groups_as_documented(tmp_path):
    root = make_tree(tmp_path, BASE_TREE)
    assert build_check.check(root) == ([], [])
    targets = {t.name: t for t in build_check.read_build(os.path.join(root, "BUILD"))}
    assert targets["kood"].srcs == ["kood/__init__.py", "kood/data.py", "kood/errors.py"]
    assert targets["kood"].deps == []  # numpy is third-party: not a Bazel dep
    assert (targets["train"].kind, targets["train"].main, targets["train"].deps) == \
        ("py_binary", "kood/train.py", [":kood"])
    assert targets["test_helpers"].testonly
    assert targets["test_data"].macro and targets["test_data"].deps == [":kood", ":test_helpers"]
    assert "pytest_main" not in targets  # the macro's runner is no binary of its own


def test_module_in_no_target_names_the_target_to_add_it_to(tmp_path):
    root = make_tree(tmp_path, BASE_TREE)
    add_files(root, {"kood/metrics.py": "import numpy\n"})
    problems, _ = build_check.check(root)
    assert problems == ["kood/metrics.py is in no target; add it to srcs of :kood."]


def test_new_test_file_gets_a_complete_block_with_its_deps(tmp_path):
    root = make_tree(tmp_path, BASE_TREE)
    add_files(root, {"tests/test_train.py": "def test_x():\n    from kood import train\n"})
    [problem] = build_check.check(root)[0]
    assert problem.startswith("tests/test_train.py has no test target; add:")
    block = textwrap.dedent(problem.split("add:\n", 1)[1])
    assert block == textwrap.dedent("""\
        kood_py_test(
            name = "test_train",
            deps = [
                ":kood",
                ":test_helpers",
                ":train",
            ],
        )""")


def test_new_entry_point_gets_a_py_binary_block(tmp_path):
    root = make_tree(tmp_path, BASE_TREE)
    add_files(root, {"data_prep/__init__.py": "",
                     "data_prep/verify.py": "from kood.errors import DataError\nif __name__ == '__main__':\n    pass\n"})
    problems, _ = build_check.check(root)
    assert len(problems) == 2, problems
    assert "data_prep/__init__.py is in no target; add it to a py_library" in problems[0]
    assert problems[1].startswith("data_prep/verify.py has a __main__ block but is in no target; add:")
    assert 'name = "data_prep_verify"' in problems[1] and 'main = "data_prep/verify.py"' in problems[1]
    assert 'deps = [":kood"]' in problems[1]


def test_entry_point_inside_a_library_is_reported(tmp_path):
    root = make_tree(tmp_path, BASE_TREE)
    add_files(root, {"kood/errors.py": "if __name__ == '__main__':\n    pass\n"})
    problems, _ = build_check.check(root)
    assert problems == ['kood/errors.py has a __main__ block but is not the main of a py_binary (it is in '
                        ':kood); move it to its own py_binary with main = "kood/errors.py".']


def test_missing_and_unused_deps_are_reported_with_the_import(tmp_path):
    root = make_tree(tmp_path, BASE_TREE)
    edit_build(root, 'deps = [":kood"],\n)\n\nkood_py_test', 'deps = [":test_helpers"],\n)\n\nkood_py_test')
    edit_build(root, '":kood",\n        ":test_helpers",', '":test_helpers",\n        ":train",')
    problems, _ = build_check.check(root)
    assert sorted(problems) == sorted([
        ':test_data is missing dep :kood (tests/test_data.py imports kood); add ":kood" to its deps.',
        ":test_data has dep :train but none of its srcs imports it; remove it.",
        ':train is missing dep :kood (kood/train.py imports kood); add ":kood" to its deps.',
        ":train has dep :test_helpers but none of its srcs imports it; remove it.",
    ])


def test_missing_src_duplicate_src_and_unknown_dep(tmp_path):
    root = make_tree(tmp_path, BASE_TREE)
    edit_build(root, '"kood/__init__.py",', '"kood/__init__.py",\n        "kood/gone.py",')
    edit_build(root, 'srcs = ["kood/train.py"],', 'srcs = ["kood/train.py", "kood/errors.py"],')
    edit_build(root, 'main = "kood/train.py",\n    deps = [":kood"],', 'main = "kood/train.py",\n    deps = [":kood", ":nope"],')
    problems, _ = build_check.check(root)
    assert ":kood lists kood/gone.py, which does not exist; remove it from srcs (or remove the target)." in problems
    assert "kood/errors.py is in 2 targets (:kood, :train); keep it in one and depend on that one." in problems
    assert ":train depends on :nope, which is no target in BUILD; remove it." in problems


def test_library_may_not_depend_on_test_helpers(tmp_path):
    root = make_tree(tmp_path, BASE_TREE)
    add_files(root, {"kood/data.py": "from tests import helpers\n"})
    edit_build(root, "    visibility = [\"//visibility:public\"],\n)\n\npy_library(\n    name = \"test_helpers\"",
               "    visibility = [\"//visibility:public\"],\n    deps = [\":test_helpers\"],\n)\n\npy_library(\n"
               "    name = \"test_helpers\"")
    problems, _ = build_check.check(root)
    assert any(p.startswith(":kood depends on testonly :test_helpers (kood/data.py imports tests)") for p in problems), problems
    assert any("import each other" in p for p in problems)  # helpers import kood: a cycle


def test_lazy_and_relative_imports_count(tmp_path):
    files = dict(BASE_TREE)
    files["kood/models/__init__.py"] = "from .resnet import build\n"
    files["kood/models/resnet.py"] = "def build():\n    from ..errors import DataError\n"
    files["kood/detectors/__init__.py"] = "def get():\n    import kood.models.resnet\n"
    root = make_tree(tmp_path, files)
    found, missing = build_check.imported_files(root, "kood/models/resnet.py",
                                                set(build_check.python_files(root)))
    assert set(found) == {"kood/__init__.py", "kood/errors.py"} and missing == []
    targets = {t.name: t for t in build_check.read_build(os.path.join(root, "BUILD"))}
    # kood/models imports kood (errors) and nothing in kood imports models: its own target.
    assert targets["kood_models"].deps == [":kood"]
    assert targets["kood_detectors"].deps == [":kood", ":kood_models"]
    assert build_check.check(root) == ([], [])


def test_packages_that_import_each_other_are_merged_into_one_target(tmp_path):
    files = dict(BASE_TREE)
    files["kood/models/__init__.py"] = "from kood.errors import DataError\n"
    files["kood/run.py"] = "from kood.models import build_classifier\n"
    root = make_tree(tmp_path, files)
    targets = {t.name: t for t in build_check.read_build(os.path.join(root, "BUILD"))}
    assert "kood_models" not in targets
    assert "kood/models/__init__.py" in targets["kood"].srcs and "kood/run.py" in targets["kood"].srcs
    assert build_check.check(root) == ([], [])


def test_suggestion_keeps_hand_written_attributes(tmp_path):
    root = make_tree(tmp_path, BASE_TREE)
    edit_build(root, 'name = "test_data",', 'name = "test_data",\n    size = "large",\n    data = glob(["*.txt"]),')
    add_files(root, {"kood/metrics.py": ""})
    suggested = build_check.suggest_build(root)
    assert 'size = "large",' in suggested and 'data = glob(["*.txt"]),' in suggested
    assert '"kood/metrics.py",' in suggested


def test_import_of_a_module_that_does_not_exist_is_a_warning(tmp_path):
    files = dict(BASE_TREE)
    files["kood/data.py"] = "from kood.sources import read\n"
    root = make_tree(tmp_path, files)
    problems, warnings = build_check.check(root)
    assert problems == []
    assert warnings == ["kood/data.py imports kood.sources, which is not in the tree (not a BUILD problem)."]


def test_non_literal_srcs_is_an_error_naming_the_line(tmp_path):
    build = 'py_library(\n    name = "kood",\n    srcs = glob(["kood/*.py"]),\n)\n'
    root = make_tree(tmp_path, BASE_TREE, build=build)
    with pytest.raises(ValueError, match=r"BUILD:3: `srcs` of py_library must be a literal"):
        build_check.check(root)


def test_cli_exit_code_and_print_mode(tmp_path):
    root = make_tree(tmp_path, BASE_TREE)
    add_files(root, {"kood/metrics.py": ""})
    cmd = [sys.executable, "-m", "tools.build_check", f"--root={root}"]
    bad = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert bad.returncode == 1
    assert "kood/metrics.py is in no target; add it to srcs of :kood." in bad.stdout
    assert "1 BUILD problem(s)" in bad.stdout
    printed = subprocess.run(cmd + ["--print"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    with open(os.path.join(root, "BUILD"), "w") as f:
        f.write(printed)
    good = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert good.returncode == 0 and "BUILD is consistent" in good.stdout


def test_module_run_as_a_subprocess_is_a_dependency(tmp_path):
    root = make_tree(tmp_path, BASE_TREE)
    add_files(root, {"tests/test_cli.py": 'import subprocess, sys\n\ndef test_cli():\n'
                                          '    subprocess.run([sys.executable, "-m", "kood.train"])\n'})
    [problem] = build_check.check(root)[0]
    assert '":train",' in problem and '":kood",' in problem  # kood/__init__.py runs first
    with open(os.path.join(root, "BUILD"), "w") as f:
        f.write(build_check.suggest_build(root))
    targets = {t.name: t for t in build_check.read_build(os.path.join(root, "BUILD"))}
    assert targets["test_cli"].deps == [":kood", ":test_helpers", ":train"]
    edit_build(root, '":test_helpers",\n        ":train",\n    ],\n)\n\nkood_py_test(\n    name = "test_data"',
               '":test_helpers",\n    ],\n)\n\nkood_py_test(\n    name = "test_data"')
    assert build_check.check(root)[0] == [':test_cli is missing dep :train (tests/test_cli.py runs kood.train); '
                                          'add ":train" to its deps.']


def test_script_using_test_helpers_is_generated_testonly(tmp_path):
    files = dict(BASE_TREE)
    files["bench/bench_data.py"] = "from tests.helpers import np\n\nif __name__ == '__main__':\n    pass\n"
    root = make_tree(tmp_path, files)
    targets = {t.name: t for t in build_check.read_build(os.path.join(root, "BUILD"))}
    assert targets["bench_data"].testonly and targets["bench_data"].deps == [":test_helpers"]
    assert not targets["train"].testonly
    assert build_check.check(root) == ([], [])


def test_test_reading_a_data_directory_needs_it_in_data(tmp_path):
    root = make_tree(tmp_path, BASE_TREE)
    add_files(root, {"flags/demo.cfg": "--method=greg\n",
                     "tests/test_data.py": 'import os\nfrom kood import data\nfrom tests.helpers import np\n'
                                           'CFG = os.path.join("x", "flags", "demo.cfg")\n'})
    problems, _ = build_check.check(root)
    assert problems == [':test_data does not have flags/ in its data (tests/test_data.py names "flags"); '
                        'add data = glob(["flags/**"]).']
    with open(os.path.join(root, "BUILD"), "w") as f:
        f.write(build_check.suggest_build(root))
    assert 'data = glob(["flags/**"]),' in open(os.path.join(root, "BUILD")).read()
    assert build_check.check(root) == ([], [])


def test_git_ignored_output_dirs_are_not_data(tmp_path):
    # kood.train names "kood_runs"; a flagfile run from the repository root creates it (git-ignored)
    root = make_tree(tmp_path, {**BASE_TREE, "kood/train.py": BASE_TREE["kood/train.py"] + 'RUNS = "kood_runs"\n'})
    os.makedirs(os.path.join(root, "kood_runs", "demo"))
    subprocess.run(["git", "init", "-q", root], check=True)
    assert build_check.check(root)[0] == [':train does not have kood_runs/ in its data (kood/train.py names '
                                          '"kood_runs"); add data = glob(["kood_runs/**"]).']
    with open(os.path.join(root, ".gitignore"), "w") as f:
        f.write("/kood_runs/\n")
    assert build_check.check(root) == ([], [])
