"""A Flower app that trains with secure aggregation (secagg's SecAggWorkflow)."""
