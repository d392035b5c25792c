"""What XLA makes of a step: compiler options, the compilation cache, memory analysis and the live-range timeline."""
