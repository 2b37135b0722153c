"""`python -m tuneforge` runs the CLI."""

from tuneforge.cli.main import main

if __name__ == "__main__":
    raise SystemExit(main())
