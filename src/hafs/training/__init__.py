"""Config → plan → run. Import submodules directly; this package imports nothing heavy."""
