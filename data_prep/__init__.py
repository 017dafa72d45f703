"""Conversion CLIs: `python -m data_prep.real`, `.outliers`, `.synthetic`, ... (README, Workflow 1)."""

import sys as _sys

if _sys.argv[:1] == ["-m"]:  # imported as the parent package of `python -m data_prep.X`: a CLI is starting
    from kood.errors import quiet_startup_interrupts as _quiet

    _quiet()
