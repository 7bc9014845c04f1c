"""Default scenario: readers far outnumber senders (9 : 1), as on a real site."""

import scenarios.recorder  # noqa: F401  (records µs histograms)
from scenarios.users import EmailSender, FormReader


class Reader(FormReader):
    pass


class Sender(EmailSender):
    pass
