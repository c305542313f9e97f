"""`python -m magnet ...`: the command line, in `magnet.cli`."""
from .cli import _parser, main  # noqa: F401  (`_parser`: the argument parser, for tools and tests)

if __name__ == "__main__":
    raise SystemExit(main())
