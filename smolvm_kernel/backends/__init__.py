"""VMM drivers behind one Popen-shaped async base class."""
