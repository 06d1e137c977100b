"""Faces of the package: the demo, checks, plans and reports built on the library (nothing in the runtime imports
them). Each module with a command line runs as ``python -m easyedit_agrade.tools.<name>``:

* :mod:`.demo`, :mod:`.agrade_demo` — ``easyedit-agrade demo`` / ``make demo``;
* :mod:`.agrade_calibrate` — η calibration of a trained AGRADE archive on validation batches;
* :mod:`.instructedit_editing_area` — InstructEdit's Figure-4 picture (PCA → t-SNE of edit directions);
* :mod:`.distributed_equivalence` — the 1-process vs N-process equality check of data-parallel AGRADE;
* :mod:`.memory_plan` — per-rank memory formulas (model spec / byte terms / plans / report).
"""
