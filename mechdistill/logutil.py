"""Per-rule logging: library logs and progress bars go to the rule's log file."""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def rule_logging(log_path: str | None) -> Iterator[None]:
    """Send logging and stderr (tqdm bars) to `log_path` (also echo log records to stderr)."""
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    if not log_path:
        handler = logging.StreamHandler()
        handler.setFormatter(fmt)
        root.addHandler(handler)
        yield
        return
    Path(log_path).parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a") as fh:
        handler = logging.StreamHandler(fh)
        handler.setFormatter(fmt)
        root.addHandler(handler)
        old_err = sys.stderr
        sys.stderr = fh
        try:
            yield
        except Exception:
            logging.getLogger("mechdistill").exception("stage failed")
            raise
        finally:
            sys.stderr = old_err
            root.removeHandler(handler)
