"""Build script. The package metadata lives in pyproject.toml; this file exists for the
compiled CPU extension (csrc/), which later lands as rlrp_fast._C."""
from setuptools import setup

setup()
