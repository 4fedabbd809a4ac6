"""The explorer: every schedule of the pause points of two requests, PCT for more.

scenario    what is run, written down: requests, schedule ids, scenario files
steps       the step model: step classes, the table of the capture path, which commute
scheduler   the Scheduler: parks requests at pause points, releases one step at a time,
            reads lock waits from pg_blocking_pids()
policies    which request goes next: depth-first prefix, explicit schedule, PCT
engine      the Explorer: schedules on the in-process service, judged by the oracle
plan        what a command asks for, running it, its reports (`payrace explore`)
findings    what the schedules add up to: verdicts, golden text, console, HTML, summary
"""
