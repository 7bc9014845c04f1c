"""Only readers: the form page alone, the control every mode shares.

Closed model: ``locust -f scenarios/reader.py Reader``; open: ``... Arrivals --arrival-rate R``.
"""

import scenarios.recorder  # noqa: F401  (records µs histograms)
from scenarios.arrivals import ArrivalsUser
from scenarios.users import FormReader, read_form


class Reader(FormReader):
    pass


class Arrivals(ArrivalsUser):
    mix = ((1, read_form),)
