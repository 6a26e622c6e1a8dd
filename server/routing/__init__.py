"""Which model serves a request: the registry of served names, the delta cache, hot swap, and the scheduler."""
