"""ModelOpt's output kept out of the user's terminal."""

from __future__ import annotations

import contextlib
import io
import logging
from typing import Any

log = logging.getLogger(__name__)


@contextlib.contextmanager
def quiet_modelopt() -> Any:
    """ModelOpt and ONNX Runtime's quantizer print progress bars and histograms; keep them in the debug log."""
    out, err = io.StringIO(), io.StringIO()
    # ModelOpt sets its loggers' levels itself (INFO for AutoCast) whenever it runs.
    loggers = [logging.getLogger(n) for n in ("modelopt", "modelopt.onnx", "modelopt.onnx.autocast")]
    levels = [lg.level for lg in loggers]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            for lg in loggers:
                lg.setLevel(logging.ERROR)
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)
        for text in (out.getvalue(), err.getvalue()):
            if text.strip():
                log.debug("modelopt: %s", text.strip()[-2000:])
