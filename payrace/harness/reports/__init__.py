"""Reports: summary JSON, JUnit XML, self-contained HTML with plots, the console table.

summary     what a summary says (verdicts every writer shares) and summary.json
junit       junit.xml
html        report.html (plots from svgplot, schedules from timeline)
console     the terminal tables, with rich (the only module here that imports it)
writers     write_all(): summary.json, junit.xml and report.html into a run directory;
            claim_run_dir(): a directory no other run has
words       a checker's examples and counts in words, for JUnit, the console and the page
svgplot     latency plots as inline SVG
timeline    a race drawn as the incident write-up drew it (also used by the runner, the
            explorer, the Locust gate and the pytest plugin)
"""
