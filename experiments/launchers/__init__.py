"""Launchers: each hands a sweep's unfinished runs to one scheduler; `experiments.sweep` does the rest.

The sweep expands the config's get_sweep() into runs (`base`: a dict with arg, workdir, the medcg.train
command, done), skips the finished ones, checks their data, then calls the launcher; `--collect` reads the
results. A launcher is one module with:

    NAME, HELP              the --launcher value and its --help line
    DATA_IS_LOCAL           whether the runs read local paths as this machine sees them (then checked first)
    add_flags(parser)       its own flags, in an argument group
    check(args)             flags and --root, before anything runs (UserError: one line for the user)
    dry_run(runs, args)     print what launch would do, on stdout
    launch(runs, args)      hand the runs over; the exit status
    waits(args)             whether the runs have ended when launch returns (then the sweep collects)
    mark_active(runs, args) optional: mark runs queued or running from an earlier launch as done

Adding a scheduler is adding a module here and its name to LAUNCHERS.
"""
from experiments.launchers import local, slurm, tpu_vm, xpk

LAUNCHERS = {m.NAME: m for m in (local, slurm, tpu_vm, xpk)}
