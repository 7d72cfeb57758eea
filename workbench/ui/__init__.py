"""Panel + Bokeh dashboard over a running engine (reads telemetry only)."""
