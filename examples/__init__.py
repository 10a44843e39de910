"""Demo services for `sudo make demo` (run as processes by `synchro up`)."""
