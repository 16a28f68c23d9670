"""`resmemnet serve` (filled in by the service work)."""


def register(sub):
    pass
