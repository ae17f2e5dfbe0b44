"""What `selftest` runs: the suspend/resume cycles against a live server, their checks and their report."""
