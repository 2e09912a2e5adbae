"""`python -m lvr.cli` runs the `lvr` command."""

from .main import app

if __name__ == "__main__":
    app(prog_name="lvr")
