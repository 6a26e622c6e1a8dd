"""Mixed-delta batches: rows of different deltas share one base forward; each row's delta is a side term."""
