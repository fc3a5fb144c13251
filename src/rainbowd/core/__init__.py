"""Core: pure rbd (wire schemas, digests, chunk bookkeeping and protocol, the scheduler).

No I/O and no clock: nothing here imports another layer of rbd or an I/O
library (tests/contracts/test_import_contracts.py), so unit tests and the
simulator drive it with a fake clock.
"""
