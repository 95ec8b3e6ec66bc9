"""``python -m sagaline``: the same as the ``sagaline`` command."""

from sagaline.cli import main

main()
