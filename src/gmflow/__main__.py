"""``python -m gmflow ...`` runs the ``gmflow`` command line (see :mod:`gmflow.cli`)."""

from gmflow.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
