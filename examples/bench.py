"""Run the benchmark harness: AGRADE, the MALMEN preset, InstructEdit and EasyEdit's FT, LoRA, MEND, ROME and MEMIT
on the embedded SmolLM2-135M-Instruct, side by side.

    python examples/bench.py --quick                      # CI smoke test (a couple of minutes on a CPU)
    python examples/bench.py --plots-dir docs/img         # full benchmark (hours on a CPU)
    python examples/bench.py --methods FT,ROME --sizes 1,16

Same as ``easyedit-agrade bench``; ``--help`` lists every option. Results: ``runs/bench-*/results.json``,
``bench.md`` and PNG plots.
"""
from __future__ import annotations

import sys

from easyedit_agrade.bench import bench_main

if __name__ == "__main__":
    sys.exit(bench_main(sys.argv[1:]))
