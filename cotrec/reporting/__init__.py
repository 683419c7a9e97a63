"""Tables and plots of a run: Table 1, Table 2, stage times. Writers only: they take rows that the
stages computed and never read a stage's outputs themselves (`cotrec.report` gathers those)."""
