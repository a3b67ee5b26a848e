"""What ships beside the library: the pytest plugin and the demonstration."""
