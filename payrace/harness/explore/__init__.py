"""The explorer: every schedule of the pause points of two requests, PCT for more.

scenario    what is run, written down: requests, schedule ids, scenario files
steps       the step model: step classes, the table of the capture path, which commute;
            opaque() for an app whose code payrace has not read
scheduler   the Scheduler: parks requests at pause points, releases one step at a time,
            reads lock waits from pg_blocking_pids()
waits       who waits for whom: by the pids requests said, or by elimination
policies    which request goes next: depth-first prefix, explicit schedule, PCT
targets     what is driven in-process: the reference service (ReferenceTarget)
app         or a team's ASGI app, `--app module:factory` (AppTarget, its environment and
            lifespan)
engine      the Explorer: schedules on the in-process target, judged by the oracle
plan        what a command asks for, running it, its reports (`payrace explore`)
findings    what the schedules add up to: verdicts, golden text, console, HTML, summary
"""
