"""``python -m servers.fakegun``: the fake Mailgun's command line."""

import sys

from servers.fakegun.cli import main

sys.exit(main())
