"""Run directories: the one module that knows their files (`rundir`), and what each command does on them
(`commands`: train, resume, evaluate, calibrate, sample, report, inspect)."""
