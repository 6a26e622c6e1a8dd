"""Compression methods: sparsification primitives, the method registry, and the q search."""
