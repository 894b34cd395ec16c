"""`python -m diffpriv_core.eval ...`"""
from diffpriv_core.eval.cli import main

raise SystemExit(main())
