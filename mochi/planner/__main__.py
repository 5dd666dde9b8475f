"""`python -m mochi_xdit.mochi.planner --frames 49 163 --summary` (what `mochi-xdit plan` runs)."""

from .plan import plan_main

raise SystemExit(plan_main())
