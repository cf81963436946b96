"""Entry point of ``python -m kidneyscan.federated.deploy`` (see :func:`.cli.main`)."""

import sys

from kidneyscan.federated.deploy.cli import main

sys.exit(main())
