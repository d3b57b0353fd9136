"""The kubetune operator (kopf). Importing this package has no side effects and does not import kopf:
the handlers live in :mod:`kubetune.operator.handlers`, the entry point in :mod:`kubetune.operator.__main__`.
"""
