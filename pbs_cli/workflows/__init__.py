"""The work behind the `pbs` commands, as plain Python: no typer, no rich, no printing.

Each workflow takes plain values, reports progress through a `ProgressFn` callback
(`progress.py`), returns dataclasses and raises the `PbsError` family (`errors.py`), whose
messages name no command-line flag; `pbs_cli.commands._messages` words them for the CLI.
"""
