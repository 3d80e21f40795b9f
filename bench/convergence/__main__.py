"""Entry point of ``python -m bench.convergence`` (see :mod:`bench.convergence.cli`)."""

from bench.convergence.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
