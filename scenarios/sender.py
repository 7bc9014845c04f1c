"""Only senders: every user loads the form and posts it."""

import scenarios.recorder  # noqa: F401  (records µs histograms)
from scenarios.users import EmailSender


class Sender(EmailSender):
    pass
