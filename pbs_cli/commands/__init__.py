"""The faces of the `pbs` commands: parse options, call one workflow, print.

Only these modules import typer and rich; the work lives in `pbs_cli.workflows`.
"""
