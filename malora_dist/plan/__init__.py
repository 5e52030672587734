"""Plan a run before it starts: per-rank memory from the real build at N ranks (meta device, fake
process group), a step-time model priced on a described machine, and the layouts ranked
(docs/ARCHITECTURE.md §14 (planner))."""
