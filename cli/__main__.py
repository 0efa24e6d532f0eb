"""`python -m fwd2bot_index.cli` runs the `f2b` command line."""

from .main import app

app(prog_name="f2b")
