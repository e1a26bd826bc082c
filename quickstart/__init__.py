"""``kiban quickstart``: train, evaluate, report and serve on bundled real data (see ``run.py``)."""

from kiban.quickstart.run import QuickstartError, QuickstartOptions, run_quickstart

__all__ = ["QuickstartError", "QuickstartOptions", "run_quickstart"]
