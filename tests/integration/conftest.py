"""Integration tests that ``make test-upstream`` runs against an EasyEdit source checkout (and ``make test`` against
the PyPI wheel): the shipped YAMLs unchanged, EasyEdit's own BaseEditor, both our editors and a baseline."""
