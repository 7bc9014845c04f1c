"""Only senders: every visitor loads the form and posts it.

Closed model: ``locust -f scenarios/sender.py Sender``; open: ``... Arrivals --arrival-rate R``.
"""

import scenarios.recorder  # noqa: F401  (records µs histograms)
from scenarios.arrivals import ArrivalsUser
from scenarios.users import EmailSender, send_email


class Sender(EmailSender):
    pass


class Arrivals(ArrivalsUser):
    mix = ((1, send_email),)
