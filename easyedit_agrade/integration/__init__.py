"""Everything that touches EasyEdit: registration, the CPU layer for the PyPI wheel, model hand-over.

Only :mod:`.easyedit` imports ``easyeditor``, and only when its functions run.
"""
