"""The organism report's old name: the report is `wilke_lib.analysis.organism_report`, in the analysis layer
(it traces, edits and reads the experiments' helpers, all above `organisms`).

Kept only for tests/test_organisms.py, which imports `wilke_lib.organisms.report`; the one upward import
that tests/test_architecture.py allows (`COMPATIBILITY`). Remove it once that test imports the new name.
"""

import sys

from wilke_lib.analysis import organism_report

sys.modules[__name__] = organism_report
