"""Default scenario: readers far outnumber senders (9 : 1), as on a real site.

Closed model: ``locust -f scenarios/mixed.py Reader Sender``.
Open model: ``locust -f scenarios/mixed.py Arrivals --arrival-rate 200``.
"""

import scenarios.recorder  # noqa: F401  (records µs histograms)
from scenarios.arrivals import ArrivalsUser
from scenarios.users import EmailSender, FormReader, read_form, send_email


class Reader(FormReader):
    pass


class Sender(EmailSender):
    pass


class Arrivals(ArrivalsUser):
    mix = ((Reader.weight, read_form), (Sender.weight, send_email))
