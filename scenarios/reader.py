"""Only readers: the form page alone, the control every mode shares."""

import scenarios.recorder  # noqa: F401  (records µs histograms)
from scenarios.users import FormReader


class Reader(FormReader):
    pass
