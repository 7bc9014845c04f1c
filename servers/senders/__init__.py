"""How ``POST /send`` lets an email leave, one file per way (see :mod:`servers.modes`)."""
