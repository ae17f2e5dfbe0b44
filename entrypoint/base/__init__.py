"""What every other package needs and that needs nothing of ours: errors and exit codes, the settings type and
the library's settings, process trees, logging and output, the per-PID result records."""
