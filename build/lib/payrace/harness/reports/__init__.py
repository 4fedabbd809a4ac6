"""Reports: summary JSON, JUnit XML, self-contained HTML with plots, the console table."""
