"""kood.progress: in place on a terminal, one line per update in a log."""

import io

from kood.progress import Progress


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _run(stream) -> str:
    with Progress("convert", total=4, stream=stream, interval=0.0, log_interval=0.0) as bar:
        for _ in range(4):
            bar.update(1)
    return stream.getvalue()


def test_a_log_gets_whole_lines_and_a_terminal_one_redrawn_line():
    log = _run(io.StringIO())
    assert "\r" not in log
    lines = log.splitlines()
    assert len(lines) == 5 and lines[0].startswith("convert: 1/4 img") and lines[-1].startswith("convert: 4/4 img")
    terminal = _run(_Terminal())
    assert terminal.count("\r") == 5 and terminal.count("\n") == 1 and terminal.endswith("\n")


def test_log_lines_are_rate_limited():
    stream = io.StringIO()
    bar = Progress("read", total=1000, stream=stream)  # default log interval: 30 s
    for _ in range(1000):
        bar.update(1)
    bar.__exit__()
    assert stream.getvalue().count("\n") == 1 and "eta" in stream.getvalue()
