"""The contract shared by the client, the collector and the training code.

Only numpy and pillow may be imported here: the participant's client depends on it.
"""

SCHEMA_VERSION = 1
