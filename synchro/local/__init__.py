"""Pods as Linux network namespaces: shared by the tests and by `synchro up`."""
