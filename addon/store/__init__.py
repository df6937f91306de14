"""The journal side: PostgreSQL (schema, statements, the embedded server, the lease), encryption at
rest, and the replay index a run's journal loads into.
"""
