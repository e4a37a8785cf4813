import os
import sys

# The references live beside the tests; make them importable as a plain module.
sys.path.insert(0, os.path.dirname(__file__))
