"""``python -m proxy``: the same as the ``vlcache`` command."""

from .cli import main

main()
