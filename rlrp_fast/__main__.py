"""``python -m rlrp_fast`` runs the command line (see :mod:`rlrp_fast.cli`)."""
from rlrp_fast.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
