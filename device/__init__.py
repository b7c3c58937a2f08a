"""Target hardware registry, GPU detection, telemetry, memory planner and benchmarks."""
