import os
import sys

# worker functions in tests/ are pickled by module name for autoshard.launch's child processes
sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("PYTHONPATH", os.path.dirname(__file__))
