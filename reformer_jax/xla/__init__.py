"""What XLA makes of a step: compiler options, the compilation cache, memory analysis, the live-range timeline, the
profile of its time (`profile`) and the longest sequence it fits in a device's memory (`longest_fit`)."""
