from agrade_helpers import tok  # noqa: F401  (session fixture)
