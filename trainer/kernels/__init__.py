"""Custom kernels, each proven against the library result it replaces (tests) and kept only where a profile showed
the library's kernel was the bottleneck (bench/results/decode_profile.json)."""
