"""Which run a command continues: planning a run folder (fresh runs never overwrite, resumes pass the
preflight), a relaunched job finding its run, one process per run folder."""
