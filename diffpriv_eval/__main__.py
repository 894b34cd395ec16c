"""`python -m diffpriv_eval ...`, the same as `diffpriv eval ...`"""
from diffpriv_eval.cli import main

raise SystemExit(main())
