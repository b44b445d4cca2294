"""`python -m serve_app.storage`: the database commands (see `storage.cli`)."""

import sys

from serve_app.storage.cli import main

sys.exit(main())
