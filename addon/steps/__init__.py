"""A step's life cycle: matched, replayed or recorded, sent once (single flight), answered or left
in doubt; the options that shape it.
"""
