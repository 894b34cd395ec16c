"""The small protocols the core needs from a host, and their implementations."""
