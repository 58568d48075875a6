"""Holds a Python process as it is about to import one module, for a test to signal it there
(tests/integration/test_operator_commands.py): on PYTHONPATH, with HSESHOP_TEST_HOLD_IMPORT_OF
naming the module, and HSESHOP_TEST_HELD_FILE a file made once it is held. It waits there until a
signal ends it (Ctrl-C's, its handler raising or its default action ending the process) or the
test kills it; without the variables, it does nothing."""

import os
import sys
import time

_MODULE = os.environ.get("HSESHOP_TEST_HOLD_IMPORT_OF")
_HELD_FILE = os.environ.get("HSESHOP_TEST_HELD_FILE")


class _HoldImport:
    def find_spec(self, name, path=None, target=None):
        if name == _MODULE:
            sys.meta_path.remove(self)
            with open(_HELD_FILE, "w"):
                pass
            while True:  # (held in the import until killed: the scenario)
                time.sleep(1)
        return None


if _MODULE and _HELD_FILE:
    sys.meta_path.insert(0, _HoldImport())
