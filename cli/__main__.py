"""`python -m lvr.cli` runs the `lvr` command."""

from .main import run

if __name__ == "__main__":
    run()
