"""``python -m kiln_client`` is the ``kiln`` command."""

from kiln_client.cli import run

run()
