"""Panel + Bokeh dashboard over a running engine (reads telemetry only).

    from workbench.ui import Dashboard
    Dashboard(engine)          # in a JupyterLab cell (after pn.extension(inline=True))

`workbench serve` serves the same Dashboard as a Panel app (see `workbench.ui.app`).
Plot data are pure functions of telemetry in `workbench.ui.data`; importing
that module does not import Panel.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Dashboard", "serve"]


def __getattr__(name: str) -> Any:
    # Panel is imported only when the dashboard itself is asked for.
    if name == "Dashboard":
        from .dashboard import Dashboard

        return Dashboard
    if name == "serve":
        from .app import serve

        return serve
    raise AttributeError(f"module 'workbench.ui' has no attribute {name!r}")
