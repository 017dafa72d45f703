"""Bazel macros of kood."""

def kood_py_test(name, deps = [], srcs = [], **kwargs):
    """A py_test that runs tests/<name>.py with pytest.

    Test files hold pytest functions, not a main, so every test's main is the
    shared runner tools/pytest_main.py, given the test file as argument.
    tools/build_check.py knows this macro: keep the two in step.

    Args:
      name: test file stem; the file is tests/<name>.py.
      deps: targets the test imports (plus :test_helpers for conftest.py).
      srcs: extra sources, rarely needed.
      **kwargs: passed to py_test (size, tags, data, ...).
    """
    native.py_test(
        name = name,
        srcs = ["tests/%s.py" % name, "tools/pytest_main.py"] + srcs,
        main = "tools/pytest_main.py",
        args = ["tests/%s.py" % name] + kwargs.pop("args", []),
        deps = deps,
        **kwargs
    )
