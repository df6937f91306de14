"""What a request is: who sent it (identity), what it asks (fingerprint, bodies), what of it is
secret (redaction), what its answer cost (usage). Pure functions, no I/O.
"""
