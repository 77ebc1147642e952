"""`python -m benchmarks.drivers LIB WORKLOAD ...`: import `<LIB>_driver` as a module, then run it.

Importing it by its module name (not as __main__) keeps task names the same in the producer and in the
worker process, which imports the same module.
"""

import importlib
import sys

from benchmarks.drivers._common import run

if __name__ == "__main__":
    module = importlib.import_module(f"benchmarks.drivers.{sys.argv[1]}_driver")
    run(module.Driver(), sys.argv[2:])
