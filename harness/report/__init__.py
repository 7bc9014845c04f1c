"""Reports and charts rebuilt from results folders alone."""
