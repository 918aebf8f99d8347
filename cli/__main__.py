"""``python -m cli``: the ``sagabus`` command line."""

from cli import main

main()
