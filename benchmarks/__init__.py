"""The harness: configs, the run command, timing, results, reports and the regression check."""
