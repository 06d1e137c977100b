"""Everything that touches EasyEdit: registration, the CPU layer for the PyPI wheel, model hand-over, ``BaseEditor``
for the faces, EasyEdit's own baselines and their compatibility shims.

Only this package imports ``easyeditor``, and only when its functions run (the import contract in setup.cfg and
``tests/foundation/test_import_contract.py`` check it).
"""
